"""No path loses data: collisions with the input's files, unwritable outputs, non-finite weights, bad options,
corrupted inputs (fuzzed), interrupted runs. Every failure is one line with the documented exit code."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import sha256
from onnx import TensorProto, helper, numpy_helper

from permsparse.cli import main

FAST = ["--method", "identity", "--reconstruct", "none", "-q", "--workers", "1"]


def _model(path: Path, *, k: int = 16, n: int = 16, nan: bool = False, inf: bool = False, external: bool = False,
           name_w1: str = "w1", data_name: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((k, n)).astype(np.float32)
    w2 = rng.standard_normal((n, k)).astype(np.float32)
    if nan:
        w1[3, 4] = np.nan
    if inf:
        w2[0, 0] = np.inf
    nodes = [helper.make_node("MatMul", ["x", name_w1], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", k])],
        initializer=[numpy_helper.from_array(w1, name_w1), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_name or (path.name + ".data"), size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def _error(capsys, argv, code=None):
    got = main(argv)
    err = capsys.readouterr().err
    assert got != 0 and (code is None or got == code), (got, err)
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _files_hash(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_renamed_model_with_external_data_is_refused(tmp_path, capsys):
    """orig.onnx keeps its weights in model.onnx.data: writing -o model.onnx would overwrite them."""
    src = _model(tmp_path / "orig.onnx", external=True, data_name="model.onnx.data")
    before = _files_hash(tmp_path)
    err = _error(capsys, ["optimize", str(src), "-o", str(tmp_path / "model.onnx"), *FAST], code=1)
    assert "would overwrite an external-data file the input reads" in err
    assert _files_hash(tmp_path) == before
    # the input file itself, through another path spelling
    err = _error(capsys, ["optimize", str(src), "-o", str(tmp_path / "." / "orig.onnx"), *FAST], code=1)
    assert "would overwrite the input model" in err and _files_hash(tmp_path) == before


def test_unwritable_output_fails_before_work(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    src = _model(tmp_path / "m.onnx")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        t = time.perf_counter()
        err = _error(capsys, ["optimize", str(src), "-o", str(ro / "o.onnx"), *FAST], code=1)
        assert "cannot write" in err and time.perf_counter() - t < 10
    finally:
        ro.chmod(0o700)


def test_output_folder_is_a_file(tmp_path, capsys):
    src = _model(tmp_path / "m.onnx")
    (tmp_path / "file").write_text("x")
    err = _error(capsys, ["optimize", str(src), "-o", str(tmp_path / "file" / "o.onnx"), *FAST], code=1)
    assert "cannot write" in err


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_weights_are_named(tmp_path, capsys, kind):
    src = _model(tmp_path / "m.onnx", nan=kind == "nan", inf=kind == "inf")
    err = _error(capsys, ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), *FAST], code=1)
    assert ("'w1'" if kind == "nan" else "'w2'") in err and "NaN/Inf" in err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("argv, message", [
    (["--budget-s", "0"], "must be > 0"),
    (["--budget-s", "-5"], "must be > 0"),
    (["--workers", "0"], "must be >= 1"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--calib", "x.txt", "--importance", "magnitude", "--reconstruct", "none"], "only used by calibrated importances"),
    (["--cluster", "mars"], "--cluster"),
    (["--method", "magic"], "invalid choice"),
])
def test_bad_options_are_usage_errors(tmp_path, capsys, argv, message):
    src = _model(tmp_path / "m.onnx")
    if "x.txt" in argv:
        (tmp_path / "x.txt").write_text("hello\n")
        argv = [a if a != "x.txt" else str(tmp_path / "x.txt") for a in argv]
    code = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), *argv])  # argparse's errors too: one line
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_binary_calibration_file(tmp_path, capsys, exported):
    src = exported("minilm", "legacy")
    capsys.readouterr()
    bad = tmp_path / "calib.txt"
    bad.write_bytes(bytes(range(256)) * 40)
    err = _error(capsys, ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--importance", "wanda", "--calib",
                          str(bad), *FAST], code=1)
    assert "not UTF-8 text" in err


def test_json_error_shape(tmp_path, capsys):
    import json

    code = main(["inspect", str(tmp_path / "missing.onnx"), "--json"])
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert code == 1 and doc == {"command": "inspect", "ok": False, "error": doc["error"], "exit_code": 1}


def test_version_and_help_are_fast():
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "permsparse.cli", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("permsparse ")
    run = subprocess.run([sys.executable, "-m", "permsparse.cli", "optimize", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--reconstruct" in run.stdout
    assert time.perf_counter() - t < 6  # two interpreter starts; each well under a second on an idle machine
    code = "import sys, permsparse.cli; print(sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------------- fuzzing


def _corruptions(base: bytes, rng: random.Random, count: int):
    for i in range(count):
        kind = i % 5
        data = bytearray(base)
        if kind == 0:  # truncated
            yield "truncate", bytes(data[: rng.randrange(0, len(data))])
        elif kind == 1:  # random byte flips
            for _ in range(rng.randrange(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            yield "flip", bytes(data)
        elif kind == 2:  # random bytes
            yield "random", bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400)))
        elif kind == 3:  # a chunk duplicated or deleted
            a = rng.randrange(len(data))
            b = min(len(data), a + rng.randrange(1, 64))
            yield "splice", bytes(data[:a] + data[b:] if rng.random() < 0.5 else data[:b] + data[a:])
        else:  # valid protobuf, odd content: weird names, dims, types
            yield "content", None


def _odd_model(path: Path, rng: random.Random) -> None:
    choice = rng.randrange(6)
    if choice == 0:
        _model(path, name_w1="w/../..\\weird name ü\n")
    elif choice == 1:
        _model(path, k=6, n=10)
    elif choice == 2:  # external data outside the model's folder ('..' in the location)
        m = onnx.load(str(_model(path, external=True)), load_external_data=False)
        outside = path.parent.parent / (path.parent.name + "_outside.data")
        Path(str(path) + ".data").rename(outside)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../" + outside.name
        path.write_bytes(m.SerializeToString())
    elif choice == 3:
        m = onnx.load(str(_model(path)))
        m.graph.initializer[0].dims[0] = 17  # dims disagree with the data
        onnx.save(m, str(path))
    elif choice == 4:
        m = onnx.load(str(_model(path, external=True)))
        Path(str(path) + ".data").write_bytes(b"short")  # truncated external data
    else:
        m = onnx.load(str(_model(path)))
        m.graph.node[0].op_type = "NoSuchOp"
        onnx.save(m, str(path))


def test_fuzz_corrupted_inputs_never_traceback(tmp_path, capsys):
    """≥ 200 corrupted or odd inputs: each gives exit 0 or a one-line error, and the input files are unchanged."""
    rng = random.Random(1234)
    base = _model(tmp_path / "base.onnx").read_bytes()
    cases = 0
    for i, (kind, data) in enumerate(_corruptions(base, rng, 210)):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        path = folder / "m.onnx"
        if data is None:
            _odd_model(path, rng)
        else:
            path.write_bytes(data)
        before = _files_hash(folder)
        verb = ["inspect", str(path)] if i % 3 else ["optimize", str(path), "-o", str(folder / "out" / "o.onnx"), *FAST]
        code = main(verb)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, (kind, captured.err)
        if code != 0:
            assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, (kind, captured.err)
            assert code in (1, 2, 3)
            assert not (folder / "out" / "o.onnx").exists()
        assert _files_hash(folder) == before, kind
        cases += 1
    assert cases >= 200


# ------------------------------------------------------------------------------------------------- interruptions


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killed_run_leaves_no_partial_output(tmp_path, exported, sig):
    src = exported("minilm", "legacy")
    before = sha256(src)
    out = tmp_path / "o.onnx"
    rng = random.Random(int(sig))
    proc = subprocess.Popen([sys.executable, "-m", "permsparse.cli", "optimize", str(src), "-o", str(out),
                             "--method", "lsa", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)
    time.sleep(rng.uniform(3.0, 12.0))
    children = _descendants(proc.pid)
    proc.send_signal(sig)
    t = time.perf_counter()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{sig!r} did not stop optimize within 30 s")
    stopped = time.perf_counter() - t
    assert sha256(src) == before
    if out.exists():  # finished before the signal: then complete and valid
        onnx.checker.check_model(str(out))
    if sig != signal.SIGKILL and proc.returncode != 0:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        assert stopped < 15
        assert not list(tmp_path.glob(".permsparse-tmp-*"))
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in children):
        time.sleep(0.2)
    assert not [p for p in children if _alive(p)], "worker processes outlived the run"


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT and SIGTERM as a shell gives them (default action), whatever this test
    process inherited or set (an ignored SIGINT is inherited across exec, and Python then installs no
    KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        cur = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == cur]
        out += kids
        frontier += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_readme_python_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 1, "the README has one Python example"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "example.py").write_text(blocks[0])  # as a user would save it: a script run as __main__
    out = subprocess.run([sys.executable, "example.py"], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "14 of 15 weights are 2:4", out.stdout  # lm_head stays dense
    assert (tmp_path / "llama.sparse.onnx").is_file() and (tmp_path / "llama.sparse.recipe.json").is_file()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_non_finite_16bit_weights_are_found(dtype, bad):
    """16-bit weights are checked on their exponent bits (fast at 7B); NaN, +Inf and -Inf are all caught, and the
    largest finite values are not."""
    import ml_dtypes
    from onnx import helper, numpy_helper

    from permsparse.errors import PermsparseError
    from permsparse.ir.model import check_finite

    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    w = np.linspace(-1, 1, 64, dtype=np.float32).astype(np_dtype).reshape(8, 8)
    info = np.finfo(np_dtype) if dtype == "float16" else ml_dtypes.finfo(np_dtype)
    w[0, 0], w[0, 1] = info.max, info.min
    if bad is not None:
        w[5, 3] = bad
    tensor = numpy_helper.from_array(w, "w")
    assert tensor.data_type == (onnx.TensorProto.FLOAT16 if dtype == "float16" else onnx.TensorProto.BFLOAT16)
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[tensor]))
    if bad is None:
        check_finite(model, None, "m.onnx")
    else:
        with pytest.raises(PermsparseError, match="'w' holds 1 NaN/Inf"):
            check_finite(model, None, "m.onnx")
