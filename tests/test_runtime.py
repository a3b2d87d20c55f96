"""Runtime: shapes, precision conversion, engine builds (tensorrt_rtx on CPU), bench tables/plots/ort backend.

TensorRT tests build real engines with whichever of tensorrt / tensorrt_rtx imports (skipped if neither); running
engines and the torch 2:4 kernels need a CUDA GPU (``gpu`` tests, skipped without one).
"""

from __future__ import annotations

import hashlib
import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from permsparse.cli import main as cli_main
from permsparse.errors import PermsparseError
from permsparse.ir.inputs import InputSpec
from permsparse.ir.shapes import (
    ShapeSpec,
    derive_profiles,
    merge_profile_args,
    parse_shape_arg,
    parse_shapes,
)
from permsparse.ir.weights import WeightInfo, WeightStatus, model_weight_status
from permsparse.passes.shapes import token_counts
from permsparse.pattern import check_nm
from permsparse.runtime import precision as prec
from permsparse.runtime.bench import (
    BenchConfig,
    BenchResult,
    BenchRow,
    format_table,
    plot_result,
    run_bench,
)
from permsparse.runtime.timing import TimingStats, time_callable


def prunable_weights(model: onnx.ModelProto, base_dir: str | None = None) -> list[WeightStatus]:
    return model_weight_status(model, base_dir)


def is_2to4(w_kn: np.ndarray) -> bool:
    return check_nm(w_kn, 0, 2, 4)

REPO = Path(__file__).resolve().parents[1]


def _trt_module() -> str | None:
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            if hasattr(importlib.import_module(name), "Builder"):
                return name
        except Exception:
            continue
    return None


HAS_TRT = _trt_module() is not None
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="neither tensorrt nor tensorrt_rtx is installed")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


needs_cuda = pytest.mark.skipif(not _cuda(), reason="no CUDA GPU")


# ------------------------------------------------------------------------------------------------------ fixtures


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mask_24(model: onnx.ModelProto) -> onnx.ModelProto:
    """2:4 magnitude mask along K (axis 0) on every MatMul constant initializer [K, N]."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]]).copy()
            if w.ndim != 2:
                continue
            k, n = w.shape
            g = np.abs(w).reshape(k // 4, 4, n)
            keep = np.zeros_like(g, dtype=bool)
            np.put_along_axis(keep, np.argsort(-g, axis=1)[:, :2], True, axis=1)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w * keep.reshape(k, n), node.input[1]))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    class Block(torch.nn.Module):
        def __init__(self, d: int = 256, heads: int = 4) -> None:
            super().__init__()
            self.h = heads
            self.ln1 = torch.nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
            self.ln2 = torch.nn.LayerNorm(d)
            self.fc1 = torch.nn.Linear(d, 2 * d)
            self.fc2 = torch.nn.Linear(2 * d, d)
            self.head = torch.nn.Linear(d, 64)  # small: below the 256-channel threshold

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, d = x.shape
            h = self.ln1(x)
            split = lambda t: t.reshape(b, s, self.h, d // self.h).transpose(1, 2)
            q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
            att = (q @ k.transpose(-1, -2) / (d // self.h) ** 0.5).softmax(-1)
            x = x + self.o((att @ v).transpose(1, 2).reshape(b, s, d))
            x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))
            return self.head(x)

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models")
    dense = d / "dense.onnx"
    torch.onnx.export(
        Block().eval(), (torch.randn(2, 8, 256),), str(dense), dynamo=False, opset_version=17,
        input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}},
    )
    sparse = d / "sparse.onnx"
    onnx.save(_mask_24(onnx.load(str(dense))), str(sparse))
    return {"dense": dense, "sparse": sparse, "dir": d}


# -------------------------------------------------------------------------------------------------------- shapes


def test_parse_shape_arg() -> None:
    s = parse_shape_arg("input_ids:1x8,4x128,8x512")
    assert (s.name, s.min, s.opt, s.max) == ("input_ids", (1, 8), (4, 128), (8, 512))
    s = parse_shape_arg("past_key_values.0.key:2x4")
    assert s.min == s.opt == s.max == (2, 4)
    assert parse_shape_arg("a:b:1x2").name == "a:b"
    assert str(parse_shape_arg("x:1x8,4x128,8x512")) == "x:1x8,4x128,8x512"
    shapes = parse_shapes(["a:1x2 b:3", "c:1,2,3"])
    assert set(shapes) == {"a", "b", "c"}
    # Polygraphy's bracket syntax and trtexec's per-profile flags give the same specs
    assert parse_shape_arg("input_ids:[1,128]") == ShapeSpec.fixed("input_ids", (1, 128))
    assert parse_shape_arg("x:[1,8],[4,128],[8,512]") == parse_shape_arg("x:1x8,4x128,8x512")
    assert parse_shapes(["a:[1,2] b:[3, 4]"])["b"].opt == (3, 4)
    prof = merge_profile_args(None, ["ids:1x8,mask:1x8"], ["ids:4x128,mask:4x128"], ["ids:8x512,mask:8x512"])
    assert prof["mask"] == ShapeSpec("mask", (1, 8), (4, 128), (8, 512))
    assert merge_profile_args(None, None, ["ids:2x16"], None)["ids"] == ShapeSpec.fixed("ids", (2, 16))


@pytest.mark.parametrize(
    "bad, msg",
    [("noshape", "NAME:MIN"), ("x:1xa", "not a shape"), ("x:1,2", "one shape or three"),
     ("x:4,2,8", "min <= opt <= max"), ("x:1x2,3,4x5", "same rank"), (":1x2", "empty")],
)
def test_parse_shape_errors(bad: str, msg: str) -> None:
    with pytest.raises(PermsparseError, match=msg):
        parse_shape_arg(bad)


def test_derive_profiles() -> None:
    ids = InputSpec("input_ids", ("batch", "sequence"), np.dtype(np.int64))
    mask = InputSpec("attention_mask", ("batch", "sequence"), np.dtype(np.int64))
    pix = InputSpec("pixels", (None, 3, 224, 224), np.dtype(np.float32))
    prof = derive_profiles([ids, mask], parse_shapes(["input_ids:1x8,4x128,8x512"]))
    assert prof["attention_mask"] == ShapeSpec("attention_mask", (1, 8), (4, 128), (8, 512))  # shared dim_params
    prof = derive_profiles([ids, pix])
    assert prof["input_ids"].max == (32, 512) and prof["pixels"].opt == (1, 3, 224, 224)
    with pytest.raises(PermsparseError, match="fixed to 3"):
        derive_profiles([pix], parse_shapes(["pixels:1x4x224x224"]))
    with pytest.raises(PermsparseError, match="rank"):
        derive_profiles([pix], parse_shapes(["pixels:1x3"]))
    with pytest.raises(PermsparseError, match="unknown input"):
        derive_profiles([pix], parse_shapes(["nope:1"]))
    with pytest.raises(PermsparseError, match="--shapes odd:"):
        derive_profiles([InputSpec("odd", (1, "foo"), np.dtype(np.float32))])


# ------------------------------------------------------------------------------------------- weights / precision


def test_weights_and_polygraphy(models: dict[str, Path]) -> None:
    dense, sparse = (prunable_weights(onnx.load(str(models[k]))) for k in ("dense", "sparse"))
    assert len(sparse) == 7 and all(w.nm_valid for w in sparse) and not any(w.nm_valid for w in dense)
    head = [w for w in sparse if w.weight.n == 64][0]
    assert "< 256" in (head.sparse_obstacle() or "")
    assert [w for w in dense if w.weight.n == 512][0].sparse_obstacle().startswith("weights are not 2:4")
    # Gemm transB: K along axis 1.
    w = np.zeros((8, 16), np.float32)
    w[:, ::4] = 1.0
    assert is_2to4(w.T) and not is_2to4(np.ones((8, 16)))
    # Polygraphy's independent checker agrees.
    exe = Path(sys.executable).parent / "polygraphy"
    if not exe.is_file():
        pytest.skip("polygraphy not installed")
    out = subprocess.run([str(exe), "inspect", "sparsity", str(models["sparse"])],
                         capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert len(re.findall(r"Found sparse tensor", text)) == 7, text[-2000:]
    assert "Found non-sparse tensor" not in text
    tokens = token_counts(onnx.load(str(models["sparse"])), {"x": (3, 5, 256)})
    assert {tokens[w.weight.input] for w in sparse} == {15}


def test_gemm_transb_weight() -> None:
    w = np.zeros((256, 512), np.float32)  # [N, K]
    w[:, 0::4] = 1.0
    w[:, 1::4] = -2.0
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="g")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])], [numpy_helper.from_array(w, "w")],
    )
    (info,) = prunable_weights(helper.make_model(g))
    assert (info.weight.k, info.weight.n, info.weight.transposed, info.nm_valid) == (512, 256, True, True)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_precision_conversion(models: dict[str, Path], precision: str) -> None:
    src = models["sparse"]
    before = _sha(src)
    out = prec.convert_precision(src, models["dir"] / f"conv.{precision}.onnx", precision)
    assert _sha(src) == before
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    want = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    inits = {i.name: i for i in m.graph.initializer}
    mm = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert mm and all(inits[n.input[1]].data_type == want for n in mm)
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # keep_io_types
    ln_inputs = {i for n in m.graph.node if n.op_type == "LayerNormalization" for i in n.input[1:]}
    assert ln_inputs and all(inits[i].data_type == TensorProto.FLOAT for i in ln_inputs if i in inits)
    # Still 2:4 after rounding (zeros stay zero).
    assert all(w.nm_valid for w in prunable_weights(m))
    if precision == "fp16":
        import onnxruntime as ort

        x = np.random.default_rng(0).standard_normal((2, 8, 256)).astype(np.float32)
        ref = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
        got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
        assert np.abs(ref - got).max() <= 2e-2 * np.abs(ref).max()
    with pytest.raises(PermsparseError, match="already"):
        prec.convert_model(m, "fp16")
    with pytest.raises(PermsparseError, match="overwrite"):
        prec.convert_precision(src, src, precision)


def test_bf16_rounding() -> None:
    x = np.array([1.0, -2.5, 3.14159, 0.0, 1e-30, 65504.0 * 4], np.float32)
    bits = prec.fp32_to_bf16_bits(x)
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.allclose(back, x, rtol=1 / 128, atol=1e-30)


# ------------------------------------------------------------------------------------------ timing, table, plot


def _result() -> BenchResult:
    d, s = TimingStats.from_samples([2.0, 2.2, 2.1]), TimingStats.from_samples([1.0, 1.5, 1.2])
    return BenchResult("torch", "Fake GPU", "fp16", (ShapeSpec("x", (1,), (4,), (8,)),),
                       (BenchRow("1576tok 768x3072", d, s, 12), BenchRow("all linear layers", d, s)), ("a note",))


def test_stats_table_plot(tmp_path: Path) -> None:
    st = TimingStats.from_samples(list(range(1, 11)))
    assert st.median_ms == 5.5 and st.p90_ms == pytest.approx(9.1) and st.min_ms == 1
    assert (st + st).median_ms == 11 and st.scaled(2).p90_ms == pytest.approx(18.2)
    assert time_callable(lambda: None, iters=5, warmup=1).n == 5
    text = format_table(_result())
    assert "| 1576tok 768x3072 ×12" in text and "1.75×" in text and "note: a note" in text
    png = plot_result(_result(), tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bench_ort_and_cli(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _sha(models["sparse"])
    res = run_bench(models["sparse"], models["dense"],
                    BenchConfig(shapes=parse_shapes(["x:2x16x256"]), iters=5, warmup=1, plot_path=tmp_path / "b.png"))
    assert res.backend == "ort" and len(res.rows) == 1 and res.rows[0].dense.n == 5
    assert 0.5 < res.correctness["dense_vs_sparse_cosine"] <= 1.0 + 1e-9
    assert (tmp_path / "b.png").is_file() and _sha(models["sparse"]) == before
    assert cli_main(["bench", str(models["sparse"]), "--dense", str(models["dense"]), "--iters", "3",
                     "--warmup", "0", "--shapes", "x:1x4x256", "--plot", str(tmp_path / "c.png"),
                     "--save-json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and (tmp_path / "c.png").is_file() and (tmp_path / "r.json").is_file()
    with pytest.raises(PermsparseError, match="no such file"):
        run_bench(tmp_path / "missing.onnx", models["dense"])
    with pytest.raises(PermsparseError, match="unknown backend"):
        run_bench(models["sparse"], models["dense"], BenchConfig(backend="tvm"))
    if not _cuda():
        with pytest.raises(PermsparseError, match="CUDA GPU"):
            run_bench(models["sparse"], models["dense"], BenchConfig(backend="tensorrt"))
        with pytest.raises(PermsparseError, match="cuda"):
            run_bench(models["sparse"], models["dense"], BenchConfig(backend="torch", device="cuda"))


def test_sparsity_log_parsing() -> None:
    from permsparse.runtime.sparsity import (
        classify_layers,
        parse_sparsity_log,
        sparse_tactic_layers,
    )

    log = [
        "(Sparsity) Layers eligible for sparse math: /a/MatMul + /a/Add, /b/MatMul, Conv_3",
        "(Sparsity) TRT inference plan picked sparse implementation for layers: /a/MatMul + /a/Add",
    ]
    eligible, picked = parse_sparsity_log(log)
    assert eligible == ("/a/MatMul + /a/Add", "/b/MatMul", "Conv_3") and picked == ("/a/MatMul + /a/Add",)
    def mk(node: str, ok: bool, k: int = 512) -> WeightStatus:
        w = WeightInfo(node, "MatMul", "w", (k, 512), 0, k, 512, "x", "y", (), "float32", node)
        return WeightStatus(w, ok, 0.5)

    weights = [mk("/a/MatMul", True), mk("/b/MatMul", True), mk("/c/MatMul", False), mk("/d/MatMul", True, 64)]
    st = {w.node: w.status for w in classify_layers(weights, eligible, picked, set(), True)}
    assert st == {"/a/MatMul": "sparse", "/b/MatMul": "dense-faster", "/c/MatMul": "not-eligible",
                  "/d/MatMul": "not-eligible"}
    st = {w.node: w.status for w in classify_layers(weights, None, None, set(), True)}
    assert st == {"/a/MatMul": "candidate", "/b/MatMul": "candidate", "/c/MatMul": "dense", "/d/MatMul": "dense"}
    line = "Name: x, LayerType: gemm, TacticName: sm80_xmma_gemm_f16f16_sparse_tilesize, StreamId: 0, Metadata: [ONNX Layer: /e/MatMul]"
    assert sparse_tactic_layers([line]) == {"/e/MatMul"}


def test_no_tensorrt_message(monkeypatch: pytest.MonkeyPatch, models: dict[str, Path], tmp_path: Path) -> None:
    from permsparse.runtime import trt as trt_mod

    real = importlib.import_module

    def fake(name: str, *a: object) -> object:
        if name in ("tensorrt", "tensorrt_rtx"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *a)

    monkeypatch.setattr(trt_mod.importlib, "import_module", fake)
    from permsparse.runtime.trt import build_engine

    with pytest.raises(PermsparseError, match="neither `tensorrt` nor `tensorrt_rtx` is installed"):
        build_engine(models["sparse"], tmp_path / "e.plan")
    assert not (tmp_path / "e.plan").exists()


# ------------------------------------------------------------------------------------------------- TensorRT builds


@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_build_sparse_engine(models: dict[str, Path], tmp_path: Path, precision: str) -> None:
    from permsparse.runtime.trt import BuildConfig, build_engine

    before = _sha(models["sparse"])
    out = tmp_path / f"s.{precision}.plan"
    cfg = BuildConfig(precision=precision, shapes=parse_shapes(["x:1x1x256,2x64x256,4x128x256"]),
                      workspace_gb=1.0, log_path=tmp_path / "trt.log")
    try:
        report = build_engine(models["sparse"], out, cfg)
    except PermsparseError as exc:
        if precision == "bf16" and "BF16" in str(exc):
            pytest.skip(str(exc))
        raise
    assert out.is_file() and out.stat().st_size == report.engine_bytes > 10_000
    assert not list(tmp_path.glob(".*.tmp")) and _sha(models["sparse"]) == before
    assert report.precision == precision and report.sparse_flag
    assert report.profiles[0] == ShapeSpec("x", (1, 1, 256), (2, 64, 256), (4, 128, 256))
    status = {layer.node: layer for layer in report.layers}
    assert len(status) == 7 and all(layer.is_2to4 for layer in report.layers)
    head = [layer for layer in report.layers if layer.n == 64][0]
    assert head.status in ("dense", "not-eligible", "dense-faster") and "256" in head.reason
    big = [layer for layer in report.layers if layer.n != 64]
    if report.picked is None:  # TensorRT-RTX on CPU: no (Sparsity) lines, so candidates
        assert {layer.status for layer in big} == {"candidate"}
    else:
        assert all(layer.status in ("sparse", "dense-faster", "not-eligible") for layer in big)
    text = report.summary()
    assert "sparse weights flag: on" in text and status["/fc1/MatMul"].label == "fc1"
    assert "  fc1 " in text  # layers are shown by their names in the model, as inspect shows them
    assert (tmp_path / "trt.log").stat().st_size > 0


@pytest.mark.tensorrt
@needs_trt
def test_build_dense_cli_and_errors(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["build", str(models["dense"]), "-o", str(tmp_path / "d.plan"), "--no-sparse",
                     "--timing-cache", str(tmp_path / "tc.bin")]) == 0
    out = capsys.readouterr().out
    assert "sparse weights flag: off" in out and "x:1x1x256,1x128x256,32x512x256" in out  # derived profile
    assert (tmp_path / "d.plan").stat().st_size > 10_000
    assert cli_main(["build", str(models["dense"]), "-o", str(tmp_path / "d2.plan"), "--sparsity", "enable"]) == 0
    assert "weights are not 2:4" in capsys.readouterr().out
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    from permsparse.runtime.trt import BuildConfig, build_engine

    with pytest.raises(PermsparseError, match="cannot be read as ONNX"):
        build_engine(bad, tmp_path / "bad.plan")
    # A model TensorRT cannot parse: an unknown-domain op.
    g = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    odd = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]),
              str(odd))
    with pytest.raises(PermsparseError, match="could not parse|failed to build"):
        build_engine(odd, tmp_path / "odd.plan")
    assert not (tmp_path / "odd.plan").exists()
    with pytest.raises(PermsparseError, match="overwrite"):
        build_engine(models["dense"], models["dense"], BuildConfig())


# ----------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_cuda
@needs_trt
def test_sparse_engine_matches_ort(models: dict[str, Path]) -> None:
    res = run_bench(models["sparse"], models["dense"],
                    BenchConfig(backend="tensorrt", precision="fp16", shapes=parse_shapes(["x:1x1x256,2x64x256,4x128x256"]),
                                iters=5, warmup=2))
    assert res.correctness["sparse_vs_ort_max_rel_diff"] < 2e-2
    assert res.correctness["sparse_vs_ort_cosine"] > 0.999


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_torch_backend_cuda_2to4_kernels(models: dict[str, Path], dtype: str) -> None:
    """On a GPU: every 2:4 weight runs a 2:4 kernel (or its fallback says why), outputs match onnxruntime."""
    res = run_bench(models["sparse"], models["dense"],
                    BenchConfig(backend="torch", device="cuda", precision=dtype, shapes=parse_shapes(["x:8x128x256"]),
                                iters=5, warmup=2))
    assert res.precision == dtype and len(res.rows) == 1
    assert res.correctness["sparse_vs_ort_max_rel_diff"] < (2e-2 if dtype == "fp16" else 5e-2)
    assert res.correctness.get("max_rel_err_2to4_kernel_vs_dense", 0.0) < 2e-2
    assert any(n.startswith("7 2:4 weights") for n in res.notes) and any("CUDA graph" in n for n in res.notes)


def test_linear_sparse_script_without_gpu() -> None:
    script = REPO / "bench" / "linear_sparse.py"
    bad = subprocess.run([sys.executable, str(script), "--shape", "1x2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "TOKENSxKxN" in bad.stderr
    if not _cuda():
        r = subprocess.run([sys.executable, str(script), "--shape", "fc1=197x768x3072*12"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu.sh")], timeout=30).returncode == 0


# --------------------------------------------------------------------------------------- runners and the registry


def test_backend_registry_and_runner_interface(models: dict[str, Path]) -> None:
    from permsparse import cli
    from permsparse.runtime.backends import (
        Runner,
        backend_names,
        base,
        get_backend,
        register_backend,
    )
    from permsparse.runtime.backends.ort import OrtRunner

    assert backend_names() == cli.BACKENDS == ("ort", "torch", "tensorrt")
    assert get_backend("ort") is OrtRunner and OrtRunner.name == "ort" and OrtRunner.summary
    with pytest.raises(PermsparseError, match="ort, torch, tensorrt"):
        get_backend("tvm")
    with pytest.raises(RuntimeError, match="registered twice"):
        register_backend("ort")(type("Again", (OrtRunner,), {}))
    with pytest.raises(TypeError, match="Runner subclasses"):
        register_backend("notarunner")(dict)  # type: ignore[arg-type]

    calls: list[str] = []

    class EchoRunner(OrtRunner):
        """Test backend: onnxruntime, logging the lifecycle."""

        def activate(self) -> None:
            calls.append(f"activate {self.label}")
            super().activate()

        def deactivate(self) -> None:
            calls.append(f"deactivate {self.label}")
            super().deactivate()

    try:  # adding a backend = one registered Runner subclass; run_bench needs nothing else
        register_backend("echo-test")(EchoRunner)
        res = run_bench(models["sparse"], models["dense"],
                        BenchConfig(backend="echo-test", shapes=parse_shapes(["x:1x4x256"]), iters=2, warmup=0))
        assert res.backend == "echo-test" and res.rows[0].dense.n == 2
        assert calls[0] == "activate dense" and calls[-1] == "deactivate sparse"
        assert calls.count("deactivate dense") == 1 and calls.index("deactivate dense") < calls.index("activate sparse")
        assert 0.5 < res.correctness["dense_vs_sparse_cosine"] <= 1 + 1e-9
        assert res.correctness["sparse_vs_ort_max_rel_diff"] < 1e-5  # it is onnxruntime (graph optimizations on)
    finally:
        base._REGISTRY.pop("echo-test", None)
    assert "echo-test" not in backend_names()
    # The lifecycle by hand, as a context manager.
    x = np.random.default_rng(0).standard_normal((1, 4, 256)).astype(np.float32)
    with OrtRunner(models["dense"]) as runner:
        assert isinstance(runner, Runner) and runner.active
        out = runner.infer({"x": x})
        fn = runner.bind({"x": x})
        again = fn()
    assert not runner.active and list(out) == ["y"] and np.array_equal(out["y"], again[0])


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-5), ("bf16", 3e-2), ("fp16", 5e-3)])
def test_torch_evaluator_cpu_matches_ort(models: dict[str, Path], precision: str, rtol: float) -> None:
    """The rewritten graph (each 2:4 MatMul one kernel node) equals onnxruntime on the sparse and the dense model."""
    from permsparse.runtime.torch_eval import SPARSE_OP, SparseEvaluator

    x = np.random.default_rng(1).standard_normal((2, 16, 256)).astype(np.float32)
    for tag, n_kernels in (("sparse", 7), ("dense", 0)):
        ev = SparseEvaluator(models[tag], device="cpu", precision=precision)
        try:
            assert ev.precision == precision and len(ev.kernels) == n_kernels
            assert ev.program.op_types.count(SPARSE_OP) == n_kernels
            assert ev.program.op_types.count("MatMul") == (0 if tag == "sparse" else 7) + 2  # + q@k, probs@v
            assert all(k.used == "dense" and "need CUDA" in k.why for k in ev.kernels)
            got = ev.run({"x": x})["y"]
            ref = _ort(models[tag], {"x": x})["y"]
            assert got.dtype == np.float32 and got.shape == ref.shape
            assert np.abs(got - ref).max() <= rtol * np.abs(ref).max(), (tag, np.abs(got - ref).max())
            fn = ev.bind({"x": x})
            assert torch_allclose(fn()["y"], got)
        finally:
            ev.close()


def torch_allclose(t: object, ref: np.ndarray) -> bool:
    import torch

    assert isinstance(t, torch.Tensor)
    return bool(np.array_equal(t.float().numpy(), ref))


def test_torch_backend_cpu(models: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    res = run_bench(models["sparse"], models["dense"],
                    BenchConfig(backend="torch", device="cpu", shapes=parse_shapes(["x:2x16x256"]), iters=3, warmup=1))
    assert res.backend == "torch" and res.precision == "fp32" and len(res.rows) == 1
    assert res.correctness["sparse_vs_ort_max_rel_diff"] < 1e-5
    assert 0.5 < res.correctness["dense_vs_sparse_cosine"] < 0.9999  # the masks change the output
    assert any("7 2:4 weights: 7 dense" in n for n in res.notes)
    assert any("2:4 kernels need CUDA" in n for n in res.notes)
    assert not any(n.startswith("dense model: no 2:4") for n in res.notes)
    assert cli_main(["bench", str(models["sparse"]), "--dense", str(models["dense"]), "--backend", "torch",
                     "--device", "cpu", "--iters", "2", "--warmup", "0", "--shapes", "x:1x8x256", "--no-plot",
                     "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "torch" and out["rows"][0]["sparse"]["n"] == 2
    with pytest.raises(PermsparseError, match="is not one of: cpu, cuda, auto"):
        run_bench(models["sparse"], models["dense"], BenchConfig(backend="torch", device="tpu"))


def test_gpu_sh_dry_run_fast(tmp_path: Path) -> None:
    """The GPU script's CPU rehearsal, the quick steps (the full dry run is the slow test below)."""
    import os

    out = tmp_path / "r.md"
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--work", str(tmp_path / "w"), "--out",
                        str(out), "--skip", "models", "whole", "optimize", "tensorrt"],
                       capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "**CPU dry run**" in text and "| env | ok |" in text and "| cusparselt | ok |" in text
    assert "| layers | ok |" in text and "| whole | skipped (--skip) |" in text
    assert "no CUDA: torch.cuda.is_available() is False" in text and "| torch | " in text
    assert "2:4 kernels need CUDA (CPU rehearsal)" in text
    bad = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


@pytest.mark.slow
def test_gpu_sh_dry_run_full(tmp_path: Path) -> None:
    """Every step of bench/gpu.sh on tiny models, on CPU (what the GPU run does, minus the GPU)."""
    import os

    out = tmp_path / "r.md"
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--work", str(tmp_path / "w"), "--out",
                        str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    for step in ("env", "cusparselt", "layers", "models", "whole", "optimize", "tensorrt"):
        assert f"| {step} | ok |" in text, (step, text[:1500])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "[tiny shapes]" in line]  # 11 + compile
    assert len(rows) == 12 and all("×**" in line for line in rows), rows
    assert (tmp_path / "r.jsonl").stat().st_size > 0


def test_torch_evaluator_recut_keeps_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path's re-cut (host tensors read by device ops fed once as inputs) computes what the full program
    does. Rehearsed on CPU by pretending that only integer/bool tensors live on the host."""
    import permsparse
    from permsparse import ExportConfig
    from permsparse.runtime import torch_eval

    path = permsparse.export("llama", tmp_path / "llama.onnx", ExportConfig(exporter="legacy"))
    ev = torch_eval.SparseEvaluator(path, device="cpu")
    try:
        ids = np.random.default_rng(0).integers(0, 200, size=(2, 7)).astype(np.int64)
        staged = ev.stage({"input_ids": ids})
        ref = ev.program.run(staged)["logits"]
        monkeypatch.setattr(torch_eval, "_on_host", lambda t: not t.is_floating_point())
        program, fed = ev._recut(dict(staged))
        assert ev.frontier and set(fed) == {"input_ids", *ev.frontier}  # e.g. the causal mask, RoPE positions
        assert len(program) < len(ev.program)  # the host-side nodes behind the frontier are gone
        got = program.run(fed)["logits"]
        assert np.array_equal(got.numpy(), ref.numpy())
    finally:
        ev.close()
