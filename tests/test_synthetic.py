"""Synthetic LLaMA models written tensor by tensor: valid ONNX, same graph as a regular export, same numbers as torch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from permsparse.errors import PermsparseError
from permsparse.models.llama import Llama, LlamaConfig, llama_config
from permsparse.models.synthetic import (
    ALIGN,
    CONFIG_KEY,
    SOURCES_KEY,
    _chunks,
    _spec,
    torch_state_dict,
    write_llama,
)

TINY = {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 256}  # the "tiny" preset's shapes


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("syn") / "small.onnx", dtype="float32", seed=3, **TINY)


@pytest.fixture(scope="module")
def small16(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("syn16") / "small16.onnx", dtype="float16", seed=3, **TINY)


def _cfg() -> LlamaConfig:
    return LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)


def test_valid_onnx_with_all_weights_external(small):
    onnx.checker.check_model(str(small))
    model = onnx.load(str(small), load_external_data=False)
    big = [i for i in model.graph.initializer if np.prod(i.dims) >= 64]
    assert big and all(i.data_location == onnx.TensorProto.EXTERNAL for i in big)
    for init in big:
        info = {kv.key: kv.value for kv in init.external_data}
        assert info["location"] == "small.onnx.data" and int(info["offset"]) % ALIGN == 0
        assert int(info["length"]) == np.prod(init.dims) * 4
    data = small.with_name("small.onnx.data")
    params = sum(p.numel() for p in Llama(_cfg()).parameters())
    assert params * 4 <= data.stat().st_size < params * 4 + ALIGN * (len(big) + 1)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[CONFIG_KEY])["seed"] == 3 and len(json.loads(meta[SOURCES_KEY])) == 15
    assert not list(small.parent.glob(".*.tmp"))  # the staging folder is gone


def test_same_graph_as_the_regular_dynamo_export(small, exported):
    """Same ops and the same MatMul(x, W[K, N]) weights as `permsparse export llama --size tiny` (real weights)."""
    assert llama_config("tiny") == _cfg()
    ref = onnx.load(str(exported("llama", "dynamo")), load_external_data=False)
    got = onnx.load(str(small), load_external_data=False)
    assert Counter(n.op_type for n in got.graph.node) == Counter(n.op_type for n in ref.graph.node)

    def matmul_weights(m):
        inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
        return [inits[n.input[1]] for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]

    assert matmul_weights(got) == matmul_weights(ref) and len(matmul_weights(got)) == 15
    assert not any(n.op_type == "Transpose" and n.input[0] in {i.name for i in got.graph.initializer}
                   for n in got.graph.node)


def test_onnxruntime_matches_torch_with_the_same_weights(small):
    import onnxruntime as ort

    module = Llama(_cfg()).eval()
    module.load_state_dict(torch_state_dict(small), strict=True)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = module(ids).numpy()
    got = ort.InferenceSession(str(small), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})[0]
    assert got.shape == (2, 11, 256)
    scale = float(np.abs(want).max())
    assert scale > 0.1
    assert float(np.abs(got - want).max()) <= 1e-4 * scale


def test_fp16_model_runs_and_weights_are_scaled_like_an_llm(small16):
    import onnxruntime as ort

    onnx.checker.check_model(str(small16))
    sd = torch_state_dict(small16)
    assert all(v.dtype == torch.float16 for v in sd.values())
    q = sd["layers.0.self_attn.q_proj.weight"].float()
    assert q.std().item() == pytest.approx(64**-0.5, rel=0.1)  # N(0, 1/fan_in)
    down = sd["layers.1.mlp.down_proj.weight"].float()
    assert down.std().item() == pytest.approx(128**-0.5, rel=0.1)
    norm = sd["layers.0.input_layernorm.weight"].float()
    assert abs(norm.mean().item() - 1.0) < 0.05 and 0.02 < norm.std().item() < 0.1
    module = Llama(_cfg()).eval()
    module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(ids).numpy()
    got = ort.InferenceSession(str(small16), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})[0]
    assert got.dtype == np.float16
    assert float(np.abs(got.astype(np.float32) - want).max()) <= 1e-2 * float(np.abs(want).max())


def test_values_depend_only_on_seed_name_dtype_shape(small16):
    """The stored bytes of a tensor are exactly what the seeded chunk generator gives for (seed, name, dtype, shape)."""
    model = onnx.load(str(small16), load_external_data=False)
    sources = json.loads({p.key: p.value for p in model.metadata_props}[SOURCES_KEY])
    init = next(i for i in model.graph.initializer if sources.get(i.name) == "layers.1.mlp.up_proj.weight")
    info = {kv.key: kv.value for kv in init.external_data}
    with open(small16.with_name(info["location"]), "rb") as f:
        f.seek(int(info["offset"]))
        stored = f.read(int(info["length"]))
    shape = tuple(init.dims)
    mean, std = _spec("layers.1.mlp.up_proj.weight", shape, True, _cfg())
    assert stored == b"".join(_chunks("layers.1.mlp.up_proj.weight", shape, mean, std, "float16", 3))
    assert stored != b"".join(_chunks("layers.1.mlp.up_proj.weight", shape, mean, std, "float16", 4))
    assert stored != b"".join(_chunks("layers.1.mlp.gate_proj.weight", shape, mean, std, "float16", 3))


def test_clear_errors(tmp_path):
    with pytest.raises(PermsparseError, match="dynamo"):
        write_llama(tmp_path / "x.onnx", exporter="legacy", **TINY)
    with pytest.raises(PermsparseError, match="float16"):
        write_llama(tmp_path / "x.onnx", dtype="int8", **TINY)
    with pytest.raises(PermsparseError, match="n_heads"):
        write_llama(tmp_path / "x.onnx", **{**TINY, "heads": 3})
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_peak_memory_is_a_small_multiple_of_the_largest_tensor(tmp_path):
    """A ~0.5 GB model: peak RSS above the interpreter's baseline stays below 3x the largest tensor (131 MB)."""
    code = f"""
import resource, torch, onnx, onnxruntime
import permsparse.models.synthetic as s, permsparse.models.export, onnxscript.optimizer
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
s.write_llama({str(tmp_path / 'm.onnx')!r}, layers=4, hidden=1024, intermediate=2816, heads=16, kv_heads=4,
              vocab=32000, dtype="float32")
print(base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    base, peak = map(int, out.stdout.split()[-2:])
    largest = 32000 * 1024 * 4
    weights = (tmp_path / "m.onnx.data").stat().st_size
    assert weights > 3 * largest
    assert peak - base < 3 * largest, (base, peak, weights)
