"""A LLaMA-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) with seeded weights.

Written to export cleanly to ONNX with a dynamic batch and sequence length: RoPE angles are computed from
``torch.arange(seq)`` inside ``forward``, the causal mask is built from the runtime sequence length, and every
projection is a bias-free ``nn.Linear`` (one ``MatMul(x, W[K, N])`` each in the ONNX graph). No KV cache.
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
class LlamaConfig:
    """Shapes of a LLaMA-style decoder."""

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 128
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise PermsparseError(f"LlamaConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}.")
        if self.n_heads % self.n_kv_heads:
            raise PermsparseError(
                f"LlamaConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}."
            )
        if self.head_dim % 2:
            raise PermsparseError(f"LlamaConfig: head_dim={self.head_dim} must be even for RoPE.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_linear(self) -> int:
        """Number of ``nn.Linear`` layers: q, k, v, o, gate, up, down per layer plus lm_head."""
        return self.n_layers * 7 + 1


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
    # SmolLM2-135M shapes (tied embeddings).
    "small": LlamaConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, rope_theta=100000.0,
        tie_embeddings=True,
    ),
    # TinyLlama-1.1B shapes.
    "1b": LlamaConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632),
}


def llama_config(size: str) -> LlamaConfig:
    """Preset by name; raises :class:`PermsparseError` listing the valid names."""
    try:
        return LLAMA_PRESETS[size]
    except KeyError:
        raise PermsparseError(f"unknown LLaMA size {size!r}; choose one of: {', '.join(LLAMA_PRESETS)}") from None


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x²) + eps) * weight``, computed in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF convention: ``[x1, x2] -> [-x2, x1]`` over the last axis."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, KV, S, D] -> [B, KV * n_rep, S, D]`` (HF style, expand + reshape)."""
    if n_rep == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE, written out explicitly."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        n_rep = self.n_heads // self.n_kv_heads
        k = repeat_kv(k, n_rep)
        v = repeat_kv(v, n_rep)
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale + mask  # [B, H, S, S]
        attn = attn.softmax(dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.o_proj(out)


class Mlp(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """``forward(input_ids [B, S]) -> logits [B, S, vocab_size]``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rope(self, seq: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(seq, dtype=torch.float32, device=self.inv_freq.device)
        freqs = pos[:, None] * self.inv_freq[None, :]  # [S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = self._rope(s, x.dtype)
        idx = torch.arange(s, device=input_ids.device)
        future = idx[None, :] > idx[:, None]  # [S, S], True above the diagonal
        mask = torch.zeros(s, s, dtype=x.dtype, device=x.device).masked_fill(future, torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


@torch.no_grad()
def init_llama_(model: Llama, seed: int = 0) -> Llama:
    """(Re)initialise every parameter of ``model`` in place, deterministically from ``seed``."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    _init.trunc_normal_(model.embed_tokens.weight, _init.WEIGHT_STD, gen)
    for layer in model.layers:
        _init.init_norm_(layer.input_layernorm.weight, None, gen)
        attn = layer.self_attn
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            _init.init_linear_(lin, gen)
        _init.init_norm_(layer.post_attention_layernorm.weight, None, gen)
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            _init.init_linear_(lin, gen)
    _init.init_norm_(model.norm.weight, None, gen)
    if not cfg.tie_embeddings:
        _init.init_linear_(model.lm_head, gen)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    model.inv_freq.copy_(inv_freq)
    return model


def build_llama(cfg: LlamaConfig | str = "tiny", seed: int = 0) -> Llama:
    """Build a LLaMA-style decoder in eval mode with seeded weights. ``cfg`` is a config or a preset name.

    Memory-lean: the module is created on the meta device and its storage allocated once, then initialised in
    place (the ``1b`` preset takes ~4.4 GB of fp32 weights and nothing more).
    """
    if isinstance(cfg, str):
        cfg = llama_config(cfg)
    model = _init.build_on_meta(lambda: Llama(cfg))
    if cfg.tie_embeddings:  # to_empty() allocates each module's parameters separately: tie again
        model.lm_head.weight = model.embed_tokens.weight
    init_llama_(model, seed)
    model.eval()
    logger.debug("built LLaMA %s with %d parameters", cfg, _init.parameter_count(model))
    return model


def llama_example_inputs(cfg: LlamaConfig, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` for ``cfg``."""
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)}
