"""A plain Vision Transformer (ViT/DeiT style) with seeded weights, written to export cleanly to ONNX.

Attention uses separate ``q``, ``k``, ``v`` projections and is spelled out op by op (no fused QKV, no
``scaled_dot_product_attention``) so that each projection becomes its own ``MatMul(x, W[K, N])`` in the ONNX graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from permsparse.errors import PermsparseError
from permsparse.models import _init

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViTConfig:
    """Shapes of a ViT. ``dim`` must be divisible by ``heads`` and ``image_size`` by ``patch_size``."""

    image_size: int = 32
    patch_size: int = 8
    in_chans: int = 3
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise PermsparseError(f"ViTConfig: dim={self.dim} is not divisible by heads={self.heads}; pick another dim or heads.")
        if self.image_size % self.patch_size:
            raise PermsparseError(
                f"ViTConfig: image_size={self.image_size} is not divisible by patch_size={self.patch_size}."
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_linear(self) -> int:
        """Number of ``nn.Linear`` layers: q, k, v, o, fc1, fc2 per block plus the head."""
        return self.depth * 6 + 1


VIT_PRESETS: dict[str, ViTConfig] = {
    "tiny": ViTConfig(image_size=32, patch_size=8, dim=64, depth=2, heads=4, mlp_ratio=4.0, num_classes=10),
    # DeiT-Small / ViT-S/16 shapes.
    "small": ViTConfig(image_size=224, patch_size=16, dim=384, depth=12, heads=6, mlp_ratio=4.0, num_classes=1000),
    # ViT-B/16 shapes.
    "b16": ViTConfig(image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0, num_classes=1000),
}


def vit_config(size: str) -> ViTConfig:
    """Preset by name; raises :class:`PermsparseError` listing the valid names."""
    try:
        return VIT_PRESETS[size]
    except KeyError:
        raise PermsparseError(f"unknown ViT size {size!r}; choose one of: {', '.join(VIT_PRESETS)}") from None


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections, written out explicitly."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q = self.q(x).reshape(b, s, self.heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k(x).reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # [B, H, S, S]
        attn = attn.softmax(dim=-1)
        out = torch.matmul(attn, v)  # [B, H, S, D]
        out = out.transpose(1, 2).reshape(b, s, c)
        return self.o(out)


class Mlp(nn.Module):
    """fc1 → exact (erf) GELU → fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """``forward(pixel_values [B, C, H, W]) -> logits [B, num_classes]``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)  # [B, dim, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, N, dim]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        # Keep the head's input 3-D ([B, 1, dim]) so that both exporters emit MatMul(x, W[K, N]) + Add rather than
        # a Gemm(transB=1): every Linear of the model then has the same ONNX form. flatten(1), not squeeze(1): the legacy
        # exporter turns a squeeze of a dynamic dimension into an If node.
        return self.head(x[:, :1]).flatten(1)


@torch.no_grad()
def init_vit_(model: ViT, seed: int = 0) -> ViT:
    """(Re)initialise every parameter of ``model`` in place, deterministically from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    _init.init_linear_(model.patch_embed, gen)
    _init.trunc_normal_(model.cls_token, _init.WEIGHT_STD, gen)
    _init.trunc_normal_(model.pos_embed, _init.WEIGHT_STD, gen)
    for block in model.blocks:
        _init.init_norm_(block.norm1.weight, block.norm1.bias, gen)
        for layer in (block.attn.q, block.attn.k, block.attn.v, block.attn.o):
            _init.init_linear_(layer, gen)
        _init.init_norm_(block.norm2.weight, block.norm2.bias, gen)
        _init.init_linear_(block.mlp.fc1, gen)
        _init.init_linear_(block.mlp.fc2, gen)
    _init.init_norm_(model.norm.weight, model.norm.bias, gen)
    _init.init_linear_(model.head, gen)
    return model


def build_vit(cfg: ViTConfig | str = "tiny", seed: int = 0) -> ViT:
    """Build a ViT in eval mode with seeded weights. ``cfg`` is a :class:`ViTConfig` or a preset name."""
    if isinstance(cfg, str):
        cfg = vit_config(cfg)
    model = _init.build_on_meta(lambda: ViT(cfg))
    init_vit_(model, seed)
    model.eval()
    logger.debug("built ViT %s with %d parameters", cfg, _init.parameter_count(model))
    return model


def vit_example_inputs(cfg: ViTConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``pixel_values`` for ``cfg``."""
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, generator=gen)}
