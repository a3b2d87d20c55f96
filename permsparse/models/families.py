"""Seeded tiny models of the Transformer families users export, built offline from ``transformers`` configs.

Each family is a ``transformers`` model class instantiated from a small config (random weights from a fixed seed,
nothing downloaded) and wrapped as :mod:`permsparse.models.hf` wraps a local checkpoint: decoders as
``input_ids -> logits`` (no KV cache), text encoders as ``input_ids, attention_mask -> last_hidden_state``, vision
encoders as ``pixel_values -> last_hidden_state``. They keep each family's distinguishing structure (Qwen2's q/k/v
biases, Qwen3's QK-norm, Gemma's sandwich norms, soft-capping, sliding windows and scaled embeddings, Phi-3's fused
``qkv_proj``/``gate_up_proj``, GPT-2's fused ``c_attn`` in Conv1D layout, BERT-style post-norm encoders, ViT/DeiT,
CLIP's text and vision towers) at sizes that export and analyze in seconds.

Invariant: ``build_family(name, exporter, path, seed=s)`` writes the same model for the same arguments (weights from
``torch.manual_seed(s)``); every prunable dimension (hidden, intermediate, head size) is a multiple of 4.

```python
from permsparse.models.families import FAMILIES, build_family
build_family("gemma3", "legacy", "gemma3.onnx", layers=4)
```
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from permsparse.errors import PermsparseError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: hidden size, heads, KV heads, intermediate size, vocabulary, sequence length of the example inputs
HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, SEQ = 64, 4, 2, 128, 512, 16
IMAGE, PATCH = 32, 8
#: text encoders take BERT's vocabulary size, so the built-in calibration tokenizer (all-MiniLM-L6-v2's) fits them
ENCODER_VOCAB = 30522


@dataclass(frozen=True)
class Family:
    """One family: the ``transformers`` config and model class names, the task, and config overrides."""

    name: str
    config: str  # transformers config class
    model: str  # transformers model class
    task: str  # causal-lm | encoder | vision
    kwargs: Callable[[int], dict[str, Any]]  # layers -> config keyword arguments
    what: str = ""


def _decoder(layers: int, **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                tie_word_embeddings=False, **extra)


def _bert(layers: int, **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=ENCODER_VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                num_attention_heads=HEADS, max_position_embeddings=128, **extra)


def _vit(layers: int, **extra: Any) -> dict[str, Any]:
    return dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
                image_size=IMAGE, patch_size=PATCH, **extra)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", "causal-lm", lambda n: _decoder(n), "RMSNorm, RoPE, GQA, SwiGLU"),
    Family("mistral", "MistralConfig", "MistralForCausalLM", "causal-lm",
           lambda n: _decoder(n, sliding_window=8), "LLaMA layout with a sliding window"),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "causal-lm", lambda n: _decoder(n), "q/k/v biases"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "causal-lm", lambda n: _decoder(n, head_dim=16), "QK-norm"),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "causal-lm",
           lambda n: _decoder(n, head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, query_pre_attn_scalar=16),
           "sandwich norms, soft-capping, alternating sliding windows, scaled embeddings, GeGLU"),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "causal-lm",
           lambda n: _decoder(n, head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
           "sandwich norms, QK-norm, sliding windows, scaled embeddings, GeGLU"),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", "causal-lm",
           lambda n: _decoder(n, pad_token_id=0), "fused qkv_proj and gate_up_proj"),
    Family("gpt2", "GPT2Config", "GPT2LMHeadModel", "causal-lm",
           lambda n: {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": n, "n_head": HEADS, "n_positions": 128,
                          "n_inner": INTER, "tie_word_embeddings": False}, "fused c_attn, Conv1D layout, LayerNorm"),
    Family("bert", "BertConfig", "BertModel", "encoder", lambda n: _bert(n), "post-norm encoder"),
    Family("roberta", "RobertaConfig", "RobertaModel", "encoder", lambda n: _bert(n, pad_token_id=1),
           "post-norm encoder, padding-offset positions"),
    Family("distilbert", "DistilBertConfig", "DistilBertModel", "encoder",
           lambda n: {"vocab_size": ENCODER_VOCAB, "dim": HIDDEN, "hidden_dim": INTER, "n_layers": n, "n_heads": HEADS,
                          "max_position_embeddings": 128}, "post-norm encoder without token types"),
    Family("vit", "ViTConfig", "ViTModel", "vision", lambda n: _vit(n), "pre-norm vision encoder, CLS token"),
    Family("deit", "DeiTConfig", "DeiTModel", "vision", lambda n: _vit(n), "ViT with a distillation token"),
    Family("clip-text", "CLIPTextConfig", "CLIPTextModel", "encoder",
           lambda n: {"vocab_size": ENCODER_VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": n,
                          "num_attention_heads": HEADS, "max_position_embeddings": SEQ * 2}, "causal text tower, quick GELU"),
    Family("clip-vision", "CLIPVisionConfig", "CLIPVisionModel", "vision",
           lambda n: _vit(n), "pre-norm vision tower with a pre-LayerNorm"),
]}


def family_names() -> list[str]:
    return list(FAMILIES)


def _family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise PermsparseError(f"unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}") from None


def _perturb_vectors_(model: torch.nn.Module, seed: int) -> None:
    """Give every 1-D parameter (biases, norm scales, position tables' rows are 2-D) seeded non-trivial values.

    Fresh ``transformers`` models start with zero biases and unit norm scales: exporters then share one constant
    between several of them (the legacy exporter deduplicates equal initializers), which links unrelated closures
    and would hide a missed bias or norm in the fold. Real checkpoints have distinct values; so do these."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.is_floating_point():
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def build_family_module(name: str, *, layers: int = 2, seed: int = 0, batch: int = 2, seq: int = SEQ,
                        config: dict[str, Any] | None = None) -> Any:
    """The seeded model of family ``name`` wrapped for export: a :class:`permsparse.models.hf.LoadedModel`.

    ``config``: overrides of the family's config keyword arguments (e.g. a bigger ``hidden_size``)."""
    import torch

    from permsparse.models.hf import (
        CausalLMWrapper,
        EncoderWrapper,
        LoadedModel,
        VisionEncoderWrapper,
        _text_inputs,
        import_transformers,
        quiet_transformers,
    )

    fam = _family(name)
    transformers = import_transformers()
    kwargs = {**fam.kwargs(layers), **(config or {})}
    with quiet_transformers():
        cfg = getattr(transformers, fam.config)(**kwargs)
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = getattr(transformers, fam.model)(cfg).eval()
        _perturb_vectors_(model, seed)
    info = {"family": name, "model_type": cfg.model_type, "class": fam.model, "layers": layers}
    if fam.task == "vision":
        gen = torch.Generator().manual_seed(seed)
        size = int(kwargs.get("image_size", IMAGE))
        inputs = {"pixel_values": torch.randn(batch, 3, size, size, generator=gen)}
        return LoadedModel(VisionEncoderWrapper(model).eval(), inputs,
                           {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}},
                           ["last_hidden_state"], fam.task, info)
    vocab = int(kwargs.get("vocab_size", VOCAB))
    if fam.task == "causal-lm":
        return LoadedModel(CausalLMWrapper(model).eval(), _text_inputs(vocab, batch, seq, seed, with_mask=False),
                           {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                           ["logits"], fam.task, info)
    return LoadedModel(EncoderWrapper(model).eval(), _text_inputs(vocab, batch, seq, seed, with_mask=True),
                       {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                        "last_hidden_state": {0: "batch", 1: "seq"}},
                       ["last_hidden_state"], fam.task, info)


def build_family(name: str, exporter: str, path: str | os.PathLike[str], *, layers: int = 2, seed: int = 0,
                 config: dict[str, Any] | None = None, opset: int = 18) -> Path:
    """Export the seeded model of family ``name`` with ``exporter`` (``dynamo`` or ``legacy``) to ``path``.

    Raises :class:`PermsparseError` when the exporter fails on this family with the installed torch/transformers."""
    from permsparse.models.export import export_onnx

    if exporter not in ("dynamo", "legacy"):
        raise PermsparseError(f"unknown exporter {exporter!r}; choose dynamo or legacy")
    loaded = build_family_module(name, layers=layers, seed=seed, config=config)
    module, inputs, axes, outputs = loaded
    out = export_onnx(module, inputs, path, dynamo=exporter == "dynamo", dynamic_axes=axes, output_names=outputs,
                      opset=opset)
    log.info("exported the seeded %s family model (%d layers) with the %s exporter to %s", name, layers, exporter, out)
    return out
