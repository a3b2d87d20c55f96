"""`permsparse optimize` / `inspect` end to end, and every bad input the issue lists."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import EXPORTERS, sha256
from onnx import TensorProto, helper, numpy_helper

from permsparse.cli import main
from permsparse.ir.inputs import concrete_shapes as resolve_shapes
from permsparse.ir.inputs import random_feeds
from permsparse.passes.verify import check_equivalent
from permsparse.pattern import check_nm

FAST = ["--method", "lsa", "--importance", "magnitude", "--reconstruct", "none", "-q"]  # the per-weight path


def _weights_2d(path):
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and inits[node.input[1]].ndim == 2:
            out[node.input[1]] = inits[node.input[1]]
    return model, out


def _feeds(model):
    return [random_feeds(model, resolve_shapes(model, batch=2, seq=s), seed=s) for s in (6, 9)]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["vit", "llama", "minilm"])
def test_optimize_end_to_end(exported, tmp_path, capsys, name, exporter):
    src = exported(name, exporter)
    before = sha256(src)
    sparse, dense = tmp_path / "sparse.onnx", tmp_path / "dense.onnx"
    assert main(["optimize", str(src), "-o", str(sparse), *FAST]) == 0
    summary = capsys.readouterr().out
    assert "permuted dense model equals the input" in summary
    assert main(["optimize", str(src), "-o", str(dense), "--no-mask", *FAST]) == 0
    assert sha256(src) == before  # the input is never modified
    model, weights = _weights_2d(src)
    _, sparse_w = _weights_2d(sparse)
    n_pruned = sum(check_nm(w, 0, 2, 4) for w in sparse_w.values())
    heads = 1 if name in ("vit", "llama") else 0  # classifier / lm_head stay dense by default
    assert n_pruned == len(weights) - heads
    if name == "minilm":
        assert n_pruned == 36
    eq = check_equivalent(model, onnx.load(str(dense)), _feeds(model), rtol=1e-4)
    assert eq.ok, eq
    # and the sparse model is not equal (masks really applied) but still close in direction
    eq_sparse = check_equivalent(model, onnx.load(str(sparse)), _feeds(model), rtol=1e-4)
    assert not eq_sparse.ok


def test_policies_on_minilm(exported, tmp_path, capsys):
    src = exported("minilm", "legacy")
    for policy, gathers in (("fold", 0), ("global", 1), ("local", 12)):
        out = tmp_path / f"{policy}.onnx"
        assert main(["optimize", str(src), "-o", str(out), "--policy", policy, "--no-mask", *FAST]) == 0
        text = capsys.readouterr().out
        assert f"{gathers} Gather(s) added" in text
        nodes = onnx.load(str(out)).graph.node
        assert sum(n.op_type == "Gather" and n.name.startswith("permsparse/") for n in nodes) == gathers


def test_inspect_json_and_polygraphy(exported, tmp_path, capsys):
    src = exported("minilm", "dynamo")
    out = tmp_path / "s.onnx"
    assert main(["optimize", str(src), "-o", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["weights"]) == 36
    assert all(w["nm_valid"] and abs(w["density"] - 0.5) < 1e-3 for w in report["weights"])
    assert report["ok"] and report["command"] == "inspect" and report["summary"]["closures"] > 13
    assert sum(c["foldable"] for c in report["closures"]) == 12
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "36 weights, 0 valid 2:4" in text
    if shutil.which("polygraphy") is None:
        pytest.skip("polygraphy not installed")
    run = subprocess.run(["polygraphy", "inspect", "sparsity", str(out)], capture_output=True, text=True)
    log = run.stdout + run.stderr
    sparse_lines = [line for line in log.splitlines() if "Found sparse tensor" in line]
    assert len(sparse_lines) == 36, log[-2000:]
    assert "Found non-sparse tensor" not in log


# ---------------------------------------------------------------- bad input


def _mlp_model(path, k=8, n=8, dtype=TensorProto.FLOAT, share=False, dynamic_image=False):
    rng = np.random.default_rng(0)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    w1 = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np_dtype), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((n, k)).astype(np_dtype), "w2")
    inits = [w1] if share else [w1, w2]
    second = "w1" if share else "w2"
    shape = ["batch", "seq", k] if not dynamic_image else ["batch", 3, "h", "w"]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", second], ["y"], name="mm2")]
    if dynamic_image:
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1], name="t"),
                 helper.make_node("MatMul", ["xt", "w3"], ["y"], name="mm")]
        inits = [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np_dtype), "w3")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", dtype, ["b", "h", "w", "c"] if dynamic_image else ["b", "s", "c"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and err.startswith("error: ")
    return err


def test_missing_file(tmp_path, capsys):
    err = _run_error(capsys, ["optimize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")])
    assert "no such file" in err


def test_garbage_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    err = _run_error(capsys, ["optimize", str(bad), "-o", str(tmp_path / "o.onnx")])
    assert "cannot be read as ONNX" in err or "checker" in err or "no nodes" in err
    assert not (tmp_path / "o.onnx").exists()


def test_no_prunable_weights(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    err = _run_error(capsys, ["optimize", str(path), "-o", str(tmp_path / "o.onnx")])
    assert "no prunable weights" in err


def test_k_not_divisible_is_skipped_with_reason(tmp_path, capsys):
    path = _mlp_model(tmp_path / "k6.onnx", k=6, n=8)  # mm1 has K=6 (skipped), mm2 has K=8 (pruned)
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(path), "-o", str(out), "--prune-head", *FAST]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    rep = {w["weight"]: w for w in json.loads(capsys.readouterr().out)["weights"]}
    assert rep["mm1"]["reason"] == "K=6 is not divisible by M=4" and not rep["mm1"]["nm_valid"]
    assert rep["mm2"]["nm_valid"]


def test_shared_weight_is_not_pruned(tmp_path, capsys):
    path = _mlp_model(tmp_path / "shared.onnx", k=8, n=8, share=True)
    err = _run_error(capsys, ["optimize", str(path), "-o", str(tmp_path / "o.onnx")])
    assert "shared by 2 readers" in err


def test_fp16_model_stays_fp16(tmp_path, capsys):
    path = _mlp_model(tmp_path / "half.onnx", k=16, n=16, dtype=TensorProto.FLOAT16)
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(path), "-o", str(out), "--prune-head", *FAST]) == 0
    model = onnx.load(str(out))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in ("w1", "w2")}
    assert len(weights) == 2 and {w.dtype for w in weights.values()} == {np.dtype(np.float16)}
    assert all(check_nm(w, 0, 2, 4) for w in weights.values())


def test_dynamic_image_shape_needs_input_shape(tmp_path, capsys):
    path = _mlp_model(tmp_path / "img.onnx", dynamic_image=True)
    err = _run_error(capsys, ["optimize", str(path), "-o", str(tmp_path / "o.onnx")])
    assert "--shapes x:" in err
    # with the shape given, it runs (K=3 is not divisible by 4, so nothing is prunable: a clear error again)
    err = _run_error(capsys, ["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--shapes", "x:1x3x4x4"])
    assert "K=3 is not divisible by M=4" in err


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    path = _mlp_model(tmp_path / "m.onnx")
    before = sha256(path)
    err = _run_error(capsys, ["optimize", str(path), "-o", str(path)])
    assert "would overwrite the input model" in err and sha256(path) == before


def test_failed_verification_writes_nothing(tmp_path, capsys, monkeypatch, exported):
    import permsparse.pipeline.fold as steps

    real = steps.apply_fold

    def broken(graph, plan, units, perms):
        result = real(graph, plan, units, perms)
        for c in plan.closures:  # corrupt one permuted member after the fold
            for mb in c.members:
                if mb.role == "param":
                    for t in graph.tensors().values():
                        if t.name == mb.const:
                            t.values = np.asarray(t.values) + 1.0
                            return result
        return result

    monkeypatch.setattr(steps, "apply_fold", broken)
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(exported("llama", "legacy")), "-o", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 3 and "differs from the input" in err and "nothing was written" in err
    assert not out.exists() and not list(tmp_path.glob(".permsparse-*"))


def test_training_mode_dropout_is_refused(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x", "ratio", "train"], ["d"]), helper.make_node("MatMul", ["d", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=[numpy_helper.from_array(np.array(0.1, np.float32), "ratio"),
                     numpy_helper.from_array(np.array(True), "train"),
                     numpy_helper.from_array(np.ones((8, 8), np.float32), "w")],
    )
    path = tmp_path / "drop.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    err = _run_error(capsys, ["optimize", str(path), "-o", str(tmp_path / "o.onnx")])
    assert "training mode" in err and "model.eval()" in err


def test_external_data_round_trip(tmp_path, monkeypatch, exported):
    """Models over the 2 GB protobuf limit use external data; exercised here with a lowered threshold."""
    from permsparse.ir.save import save_model

    src = exported("llama", "legacy")
    big = tmp_path / "in" / "big.onnx"
    save_model(onnx.load(str(src)), big, external_data=True)
    assert (tmp_path / "in" / "big.onnx.data").exists()
    out = tmp_path / "out" / "sparse.onnx"
    assert main(["optimize", str(big), "-o", str(out), *FAST]) == 0
    assert (tmp_path / "out" / "sparse.onnx.data").exists()
    model = onnx.load(str(out))
    assert any(t.data_location == TensorProto.EXTERNAL for t in onnx.load(str(out), load_external_data=False).graph.initializer)
    assert len(model.graph.initializer) > 0


def test_module_entry_point(tmp_path):
    run = subprocess.run([sys.executable, "-m", "permsparse.cli", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "optimize" in run.stdout and "build" in run.stdout


def test_learned_method_end_to_end(exported, tmp_path, capsys):
    """`--method learned` keeps the fold exact and the masks valid, and never keeps less than plain 2:4."""
    src = exported("llama", "dynamo")
    out, dense = tmp_path / "s.onnx", tmp_path / "d.onnx"
    args = ["--method", "learned", "--importance", "magnitude", "--reconstruct", "none", "--learn-iters", "5", "-q",
            "--workers", "1"]
    assert main(["optimize", str(src), "-o", str(dense), "--no-mask", *args]) == 0
    assert main(["optimize", str(src), "-o", str(out), *args]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("importance kept per weight"))
    plain, permuted = (float(v) for v in line.replace("->", " ").split()[-3::2])
    assert permuted >= plain
    model = onnx.load(str(src))
    assert check_equivalent(model, onnx.load(str(dense)), _feeds(model), rtol=1e-4).ok
    _, weights = _weights_2d(out)
    assert sum(check_nm(w, 0, 2, 4) for w in weights.values()) == 14


def test_report(exported, tmp_path, capsys):
    src = exported("llama", "legacy")
    report = tmp_path / "report"
    assert main(["optimize", str(src), "-o", str(tmp_path / "s.onnx"), "--report", str(report), *FAST]) == 0
    text = (report / "report.md").read_text()
    assert (report / "retained.png").stat().st_size > 1000 and (report / "efficacy.png").exists()
    assert "plain 2:4 (no permutation, magnitude mask)" in text and "2:4, permsparse (lsa)" in text and "perplexity" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) >= 14


def test_output_objective_end_to_end(exported, tmp_path, capsys):
    """`--objective output` calibrates activation samples, learns on them, and still folds exactly."""
    src = exported("llama", "legacy")
    out = tmp_path / "s.onnx"
    args = ["--method", "learned", "--objective", "output", "--reconstruct", "none", "--learn-iters", "4", "-q",
            "--workers", "1"]
    assert main(["optimize", str(src), "-o", str(out), *args]) == 0
    text = capsys.readouterr().out
    assert "permuted dense model equals the input" in text and "14/14 valid 2:4" in text
