"""LLaMA-shaped ONNX models of any size with seeded weights, written one tensor at a time into external data.

:func:`write_llama` exports :class:`permsparse.models.llama.Llama` (RMSNorm, RoPE, GQA, SwiGLU: the module the
``export llama`` presets use, so the analysis sees the same graph patterns) with its parameters on torch's *meta*
device, so the export itself holds no weights. The dynamo exporter then leaves every ``nn.Linear`` as
``MatMul(x, Transpose(W))``; those Transposes are folded here by declaring the transposed initializer ``W[K, N]``
directly (what the exporter's own constant folding does with real weights). Every parameter is then generated, in
chunks of rows, from a torch generator seeded by ``(seed, parameter name, chunk)`` and appended to ``<name>.data``
at a 4 KiB-aligned offset; the initializers point at it (ONNX external data). Finally the exporter's usual ONNX
optimizer runs on the graph (it never reads tensors above its folding size limit) and the model proto (a few MB)
is written.

Weights are scaled like a trained LLM's: linear weights ``N(0, 1/fan_in)``, the embedding and lm_head
``N(0, 1/hidden)``, norm weights ``N(1, 0.05²)``; RoPE's ``inv_freq`` is exact.

Invariant: the values of a tensor depend only on ``(seed, its torch parameter name, dtype, shape)``, never on the
order of generation, and peak memory is one chunk (≤ 16 Mi elements) plus the graph: a 7B model never exists in
memory. :func:`torch_state_dict` reads the file back into the torch module's naming (transposing folded weights), which
is how the tests prove the ONNX graph computes what the torch module computes with the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from permsparse.errors import PermsparseError
from permsparse.models.llama import LLAMA_PRESETS, LlamaConfig

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
#: Offsets of tensors in the data file are multiples of this (page size: lets onnxruntime memory-map them).
ALIGN = 4096
#: Elements generated per chunk (peak memory of the generator: one chunk in the target dtype plus its bytes).
CHUNK_ELEMS = 16 * 2**20
NORM_STD = 0.05
#: Model metadata_props keys: JSON {initializer: torch parameter it holds transposed}, and the generation arguments.
SOURCES_KEY = "permsparse.synthetic.transposed_sources"
CONFIG_KEY = "permsparse.synthetic.config"
#: Bump when the generated values change for the same arguments (caches compare it).
GENERATOR_VERSION = 1

#: LLaMA-2-7B shapes (32 layers, hidden 4096, MLP 11008, 32 heads, no GQA, vocab 32000).
LLAMA2_7B = {"layers": 32, "hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "vocab": 32000}


def shapes_of(cfg: LlamaConfig) -> dict[str, int]:
    """The keyword shapes of :func:`make_config` (and :func:`write_llama`) for ``cfg``."""
    return {"layers": cfg.n_layers, "hidden": cfg.dim, "intermediate": cfg.ffn_dim, "heads": cfg.n_heads,
            "kv_heads": cfg.n_kv_heads, "vocab": cfg.vocab_size}


#: TinyLlama-1.1B shapes: the ``1b`` preset of ``export llama`` (:data:`permsparse.models.llama.LLAMA_PRESETS`).
TINYLLAMA_1B = shapes_of(LLAMA_PRESETS["1b"])


@dataclass(frozen=True)
class TensorSlot:
    """Where one initializer lives in the data file and which torch parameter it holds."""

    onnx_name: str
    source: str
    transposed: bool
    shape: tuple[int, ...]
    offset: int
    length: int


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise PermsparseError(f"dtype {dtype!r} is not supported; choose one of: {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _spec(source: str, shape: tuple[int, ...], transposed: bool, cfg: LlamaConfig) -> tuple[float, float]:
    """(mean, std) of the parameter ``source`` stored with ONNX ``shape``."""
    if len(shape) == 1:
        return 1.0, NORM_STD
    if source in ("embed_tokens.weight", "lm_head.weight"):
        return 0.0, cfg.dim**-0.5
    fan_in = shape[0] if transposed else shape[1]
    return 0.0, fan_in**-0.5


def _chunks(source: str, shape: tuple[int, ...], mean: float, std: float, dtype: str, seed: int) -> Iterator[bytes]:
    """The tensor's bytes (row-major, ONNX layout), chunk by chunk, each chunk from its own seeded generator."""
    import torch

    tdt = _torch_dtype(dtype)
    rows = shape[0]
    row_elems = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    per_chunk = max(1, CHUNK_ELEMS // max(1, row_elems))
    for ci, r0 in enumerate(range(0, rows, per_chunk)):
        n = min(per_chunk, rows - r0) * row_elems
        gen = torch.Generator().manual_seed(_seed(seed, source, ci))
        t = torch.empty(n, dtype=tdt).normal_(mean, std, generator=gen)
        yield (t.view(torch.int16) if tdt == torch.bfloat16 else t).numpy().tobytes()


def _inv_freq(cfg: LlamaConfig) -> np.ndarray:
    d = cfg.head_dim
    return (1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))).astype(np.float32)


def make_config(*, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> LlamaConfig:
    """The :class:`LlamaConfig` of these shapes (errors name the bad argument)."""
    shapes = {"layers": layers, "hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads,
              "vocab": vocab}
    for name, v in shapes.items():
        if int(v) < 1:
            raise PermsparseError(f"write_llama: {name} must be >= 1, got {v}")
    return LlamaConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                       ffn_dim=intermediate)


def _export_graph(cfg: LlamaConfig, dtype: str, opset: int):
    """The dynamo export of ``Llama(cfg)`` with meta parameters, unoptimized (an ``onnx_ir.Model``)."""
    import torch

    from permsparse.models.export import quiet_export
    from permsparse.models.llama import Llama

    with torch.device("meta"):
        module = Llama(cfg).to(_torch_dtype(dtype)).eval()
    ids = torch.zeros((2, 16), dtype=torch.int64, device="meta")
    seq = torch.export.Dim("seq")
    batch = torch.export.Dim("batch")
    with quiet_export(), torch.no_grad():
        try:
            program = torch.onnx.export(
                module, (), kwargs={"input_ids": ids}, dynamo=True,
                dynamic_shapes={"input_ids": {0: batch, 1: seq}}, input_names=["input_ids"],
                output_names=["logits"], opset_version=opset, optimize=False, verbose=False, report=False,
            )
        except Exception as exc:
            raise PermsparseError(f"exporting the LLaMA graph without weights failed: {type(exc).__name__}: {exc}\n"
                                  "This needs torch's dynamo exporter (torch>=2.5, onnxscript).") from exc
    return program.model


def _fold_transposes(model) -> dict[str, tuple[str, bool]]:
    """Replace ``Transpose(W)`` of a 2-D parameter used only there by an initializer ``Wᵀ``; map every parameter
    initializer's name to (torch parameter name, transposed)."""
    import onnx_ir as ir

    graph = model.graph
    sources: dict[str, tuple[str, bool]] = {}
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        perm = node.attributes.get("perm")
        if (src is None or not src.is_initializer() or len(src.shape) != 2 or len(src.uses()) != 1
                or (perm is not None and list(perm.as_ints()) != [1, 0])):
            continue
        out = node.outputs[0]
        folded = ir.Value(name=out.name, shape=ir.Shape([src.shape[1], src.shape[0]]), type=src.type,
                          const_value=ir.tensor(np.zeros((1,), dtype=np.float32), name=out.name))  # placeholder
        out.replace_all_uses_with(folded, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        graph.initializers.pop(src.name)
        graph.register_initializer(folded)
        sources[folded.name] = (src.name, True)
    for name in graph.initializers:
        sources.setdefault(name, (name, False))
    return sources


def _is_placeholder(value) -> bool:
    raw = getattr(value.const_value, "raw", None)
    return value.const_value is None or getattr(getattr(raw, "device", None), "type", None) == "meta" or (
        value.shape is not None and value.const_value.shape != value.shape)


def write_llama(
    path: str | os.PathLike[str],
    *,
    layers: int = 32,
    hidden: int = 4096,
    intermediate: int = 11008,
    heads: int = 32,
    kv_heads: int = 32,
    vocab: int = 32000,
    dtype: str = "float16",
    seed: int = 0,
    exporter: str = "dynamo",
    opset: int = 18,
) -> Path:
    """Write an ONNX LLaMA with seeded weights to ``path`` (+ ``<name>.data``) and return ``path``.

    Defaults are LLaMA-2-7B's shapes (13.5 GB of fp16 weights). Input ``input_ids [batch, seq]`` (int64), output
    ``logits [batch, seq, vocab]``. Written atomically (temp files beside ``path``, then renames: data first).
    """
    import onnx
    import onnx_ir as ir

    if exporter != "dynamo":
        raise PermsparseError(f"write_llama traces the graph without weights, which only the dynamo exporter can do; "
                              f"got exporter={exporter!r}. Use exporter='dynamo' (or `permsparse export llama "
                              f"--exporter legacy` for the small presets).")
    _torch_dtype(dtype)
    cfg = make_config(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                      vocab=vocab)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    t0 = time.perf_counter()
    model = _export_graph(cfg, dtype, opset)
    sources = _fold_transposes(model)
    graph = model.graph
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        offset, slots = 0, []
        with open(tmp / data_name, "wb") as f:
            for name, value in list(graph.initializers.items()):
                if not _is_placeholder(value):
                    continue  # a constant the exporter computed (shapes, scalars): keep it inline
                source, transposed = sources[name]
                shape = tuple(int(d) for d in value.shape)
                if source == "inv_freq":
                    arr = _inv_freq(cfg).astype(value.dtype.numpy())
                    value.const_value = ir.tensor(arr, name=name)
                    continue
                pad = (-offset) % ALIGN
                f.write(b"\0" * pad)
                offset += pad
                mean, std = _spec(source, shape, transposed, cfg)
                start = offset
                for chunk in _chunks(source, shape, mean, std, dtype, seed):
                    f.write(chunk)
                    offset += len(chunk)
                slots.append(TensorSlot(name, source, transposed, shape, start, offset - start))
                value.const_value = ir.ExternalTensor(data_name, start, offset - start, value.dtype,
                                                      shape=ir.Shape(shape), name=name, base_dir=str(tmp))
        _optimize(model)
        model.metadata_props[SOURCES_KEY] = json.dumps(
            {s.onnx_name: s.source for s in slots if s.onnx_name in model.graph.initializers and s.transposed})
        model.metadata_props[CONFIG_KEY] = json.dumps(
            {"layers": layers, "hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads,
             "vocab": vocab, "dtype": dtype, "seed": seed, "opset": opset, "generator": GENERATOR_VERSION})
        proto = ir.to_proto(model)
        _name_logits_dims(proto)
        onnx.save_model(proto, str(tmp / path.name))
        from permsparse.models.export import _publish

        _publish(tmp / data_name, path.parent / data_name)
        _publish(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: %d layers, hidden %d, %s, %.2f GB of weights in %.1f s", path, layers, hidden, dtype,
             offset / 1e9, time.perf_counter() - t0)
    return path


def _optimize(model) -> None:
    """The exporter's own ONNX optimizer (constant folding of small subgraphs, CSE, unused nodes)."""
    try:
        import onnxscript.optimizer
    except ImportError:  # pragma: no cover - onnxscript comes with the dynamo exporter
        log.warning("onnxscript missing: the synthetic graph is left unoptimized")
        return
    onnxscript.optimizer.optimize_ir(model)


def _name_logits_dims(proto) -> None:
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        for axis, name in ((0, "batch"), (1, "seq")):
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = name


def torch_state_dict(path: str | os.PathLike[str]) -> dict[str, object]:
    """Read a :func:`write_llama` model's weights back as the torch module's ``state_dict`` (for tests; loads all)."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if SOURCES_KEY not in meta:
        raise PermsparseError(f"{path} was not written by permsparse.models.synthetic.write_llama")
    transposed = json.loads(meta[SOURCES_KEY])
    out = {}
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.BFLOAT16:
            raw = np.frombuffer(init.raw_data, dtype=np.int16).reshape(tuple(init.dims))
            t = torch.from_numpy(raw.copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.array(numpy_helper.to_array(init)))
        if init.name in transposed:
            out[transposed[init.name]] = t.T.contiguous()
        elif init.name.endswith(".weight"):
            out[init.name] = t
    return out
