"""Issue 17 (cli-core): every policy × reconstruction on both exporters, 16-bit models, block-wise resume, names."""

from __future__ import annotations

import onnx
import pytest
from conftest import EXPORTERS, sha256
from onnx import numpy_helper

from permsparse.pattern import check_nm
from permsparse.pipeline import optimize
from permsparse.pipeline.config import OptimizeConfig


def _matmul_weights(path):
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    return {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2}


@pytest.mark.parametrize("reconstruct", ["sparsegpt", "none"])
@pytest.mark.parametrize("policy", ["fold", "global", "local"])
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["llama", "vit"])
def test_every_policy_and_reconstruction(exported, tmp_path, name, exporter, policy, reconstruct):
    """The masks of the reconstruction are chosen in the order the fold realizes, under every policy (issue 17,
    point 0: ``global`` + SparseGPT wrote non-2:4 weights, because units spanning blocks were pruned unpermuted)."""
    src = exported(name, exporter)
    before = sha256(src)
    out = tmp_path / "s.onnx"
    res = optimize(src, out, OptimizeConfig(policy=policy, reconstruct=reconstruct, workers=1, progress=False))
    assert res.config.permutation.policy == policy and res.config.reconstruction.method == reconstruct
    assert ("block-wise" in res.timings) == (reconstruct == "sparsegpt")
    assert res.equivalence.ok and res.equivalence.max_rel_error < 1e-4
    assert res.selected and all(res.nm_valid[w] for w in res.selected)
    # independent: count the 2:4 MatMul weights in the written file
    weights = _matmul_weights(out)
    assert sum(check_nm(w, 0, 2, 4) for w in weights.values()) == len(res.selected)
    gathers = sum(n.op_type == "Gather" and n.name.startswith("permsparse/") for n in onnx.load(str(out)).graph.node)
    assert gathers == len(res.fold.gathers)
    if policy == "fold":
        assert gathers == 0
    if policy != "fold":  # the permutations are really used (not all identity)
        assert any((p != range(len(p))).any() for p in res.perms.values())
    assert sha256(src) == before


# ------------------------------------------------------------------------------------------------ 16-bit models


@pytest.fixture(scope="module")
def hf_dtype(tmp_path_factory):
    """``hf_dtype(exporter, dtype) -> Path``: a 1-layer HF LLaMA exported by ``permsparse export hf --dtype``."""
    transformers = pytest.importorskip("transformers")
    import torch

    root = tmp_path_factory.mktemp("hf16")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "ckpt")
    cache = {}

    def get(exporter: str, dtype: str):
        if (exporter, dtype) not in cache:
            from permsparse.cli import main

            path = root / f"{exporter}_{dtype}.onnx"
            assert main(["export", "hf", "--hf-dir", str(root / "ckpt"), "-o", str(path), "--exporter", exporter,
                         "--dtype", dtype, "-q"]) == 0
            cache[(exporter, dtype)] = path
        return cache[(exporter, dtype)]

    return get


ONNX_DTYPE = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
              "bfloat16": onnx.TensorProto.BFLOAT16}


def _optimize_and_inspect_16bit(path, out, extra, capsys):
    from permsparse.cli import main

    before = sha256(path)
    assert main(["inspect", str(path), "-q"]) == 0  # onnxruntime lacks bf16 kernels: the probe runs an fp32 copy
    assert main(["optimize", str(path), "-o", str(out), "--workers", "1", "-q", *extra]) == 0
    text = capsys.readouterr().out
    assert "permuted dense model equals the input" in text and "no prunable weights" not in text
    assert sha256(path) == before
    assert main(["inspect", str(out), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return info


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_16bit_models_optimize_and_inspect(hf_dtype, tmp_path, capsys, exporter, dtype):
    """bf16 models load, probe, calibrate (on onnxruntime's fp32 copy), mask and verify, keep their dtype, and
    ``inspect`` reads them (issue 17, point 2: "no prunable weights (weight dtype 16 ...)" and ``Where(16)``)."""
    from permsparse.ir.model import weight_values

    src = hf_dtype(exporter, dtype)
    out = tmp_path / "s.onnx"
    info = _optimize_and_inspect_16bit(src, out, ["--reconstruct", "none"], capsys)
    dense, sparse = onnx.load(str(src)), onnx.load(str(out))
    kinds = {t.data_type for t in dense.graph.initializer if len(t.dims) == 2}
    assert ONNX_DTYPE[dtype] in kinds
    # the weights keep their type, and every pruned one is 2:4 (independent check on the written values)
    d_types = {t.name: t.data_type for t in dense.graph.initializer}
    inits = {t.name: t for t in sparse.graph.initializer}
    assert all(inits[n].data_type == d_types[n] for n in d_types)
    nodes = [n for n in sparse.graph.node if n.op_type == "MatMul" and n.input[1] in inits
             and len(inits[n.input[1]].dims) == 2]
    valid = sum(check_nm(weight_values(inits[n.input[1]], None).astype("float32"), 0, 2, 4) for n in nodes)
    assert valid == 7  # the 7 block weights; lm_head stays dense
    assert info["summary"]["nm_valid"] == 7
    assert {w["dtype"] for w in info["weights"]} == {dtype} if "dtype" in info["weights"][0] else True


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_bfloat16_defaults(hf_dtype, tmp_path, capsys, exporter):
    """The defaults (block-wise SparseGPT where blocks are found) on a bf16 model."""
    info = _optimize_and_inspect_16bit(hf_dtype(exporter, "bfloat16"), tmp_path / "s.onnx", [], capsys)
    assert info["summary"]["nm_valid"] == 7


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["llama", "vit"])
def test_names_survive_the_rewrite(exported, tmp_path, name, exporter):
    """The sparse model's MatMul nodes keep the dense model's names and annotations, so ``inspect`` and ``build`` of
    the sparse model name layers as ``optimize`` and ``inspect`` of the dense model do (issue 17, point 6: a dynamo
    export's sparse model said ``node_MatMul_94`` where the dense one said ``encoder.layer.N...``)."""
    from permsparse.api import inspect
    from permsparse.ir.model import load_model
    from permsparse.ir.weights import model_weight_status

    src = exported(name, exporter)
    out = tmp_path / "s.onnx"
    res = optimize(src, out, OptimizeConfig(reconstruct="none", importance="magnitude", workers=1, progress=False))
    dense, sparse = onnx.load(str(src)), onnx.load(str(out))
    mm = lambda m: {n.name: n for n in m.graph.node if n.op_type == "MatMul"}
    assert set(mm(dense)) == set(mm(sparse))
    for n, node in mm(dense).items():
        assert [(p.key, p.value) for p in mm(sparse)[n].metadata_props] == \
            [(p.key, p.value) for p in node.metadata_props]
    labels = {w.name: w.label for w in res.plan.weights.values()}  # what optimize printed
    d_info, s_info = inspect(src), inspect(out)
    assert {w["weight"]: w["layer"] for w in s_info.weights} == {w["weight"]: w["layer"] for w in d_info.weights}
    assert {w["weight"]: w["layer"] for w in s_info.weights} == labels
    build_labels = {st.weight.name: st.weight.label for st in model_weight_status(load_model(out), out.parent)}
    assert build_labels == labels
    if exporter == "dynamo":  # module paths, not generated node names
        assert not any(label.startswith("node_") for label in labels.values()), labels


# ------------------------------------------------------------------------------------------------ resume


def test_block_checkpoint_store(tmp_path):
    """Commit / load round trip; a torn or foreign state is ignored; a commit interrupted before its state file
    leaves the previous commit loadable; older stream files go once a newer commit is in."""
    import numpy as np
    import torch

    from permsparse.pipeline.blockwise.resume import BlockCheckpoint

    ck = BlockCheckpoint(tmp_path, "a" * 64)
    assert ck.load() is None
    s0 = [(torch.arange(6.0).reshape(1, 2, 3), torch.ones(1, 2, 3))]
    w0 = {"w0": np.arange(8, dtype=np.float16).reshape(4, 2)}
    ck.commit(1, {"u0": np.array([1, 0, 2, 3])}, [{"unit": "u0", "seconds": 1.0}], [{"index": 0}], s0, w0)
    got = ck.load()
    assert got.done == 1 and np.array_equal(got.perms["u0"], [1, 0, 2, 3])
    assert torch.equal(got.streams[0][0], s0[0][0]) and torch.equal(got.streams[0][1], s0[0][1])
    assert np.array_equal(np.load(got.weights["w0"]), w0["w0"]) and np.load(got.weights["w0"]).dtype == np.float16
    assert got.unit_reports == [{"unit": "u0", "seconds": 1.0}] and got.block_reports == [{"index": 0}]
    # a second commit keeps block 0's weights, adds block 1's, drops the old stream
    s1 = [(s0[0][0] + 1, s0[0][1])]
    ck.commit(2, {"u0": np.array([1, 0, 2, 3]), "u1": np.array([0, 1])}, [], [{"index": 0}, {"index": 1}], s1,
              {"w1": np.ones((4, 4), np.float32)})
    got = ck.load()
    assert got.done == 2 and set(got.weights) == {"w0", "w1"} and torch.equal(got.streams[0][0], s1[0][0])
    assert [p.name for p in ck.root.glob("stream-*.pt")] == ["stream-2.pt"]
    # another run's key under the same folder prefix: ignored
    assert BlockCheckpoint(tmp_path, "a" * 32 + "b" * 32).load() is None
    # a damaged weight file: the whole state is ignored (start again), never half used
    path = got.weights["w1"]
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\1")
    assert ck.load() is None
    # killed after writing block 2's weights and stream but before its state file: commit 2 still stands
    ck2 = BlockCheckpoint(tmp_path / "k", "c" * 64)
    ck2.commit(1, {}, [], [{"index": 0}], s0, w0)
    real = __import__("permsparse.pipeline.blockwise.resume", fromlist=["_atomic_write"])
    orig = real._atomic_write

    def dies_on_state(path, write):
        if path.name == "state.json":
            raise KeyboardInterrupt
        orig(path, write)

    real._atomic_write = dies_on_state
    try:
        with pytest.raises(KeyboardInterrupt):
            ck2.commit(2, {}, [], [{"index": 0}, {"index": 1}], s1, {"w1": np.ones((2, 2), np.float32)})
    finally:
        real._atomic_write = orig
    got = ck2.load()
    assert got is not None and got.done == 1 and set(got.weights) == {"w0"}
    assert torch.equal(got.streams[0][0], s0[0][0])


@pytest.mark.slow
def test_work_dir_resumes_finished_blocks(exported, tmp_path, caplog):
    """A second run with the same --work-dir restores every finished block (no block recomputed) and writes the
    same bytes; another option gives another key (nothing reused)."""
    import logging

    src = exported("llama", "legacy")
    cfg = OptimizeConfig(workers=1, progress=False, work_dir=str(tmp_path / "wd"), finetune_epochs=1,
                         calib_samples=8)
    first = optimize(src, tmp_path / "a.onnx", cfg)
    assert len(first.block_reports) == 4
    with caplog.at_level(logging.INFO, logger="permsparse.pipeline.blockwise.engine"):
        second = optimize(src, tmp_path / "b.onnx", cfg)
    assert "resuming after block 4 of 4" in caplog.text
    assert "block 0:" not in caplog.text  # nothing recomputed
    assert sha256(tmp_path / "a.onnx") == sha256(tmp_path / "b.onnx")
    assert [r.err_final for r in second.block_reports] == [r.err_final for r in first.block_reports]
    assert {k: v.tolist() for k, v in second.perms.items()} == {k: v.tolist() for k, v in first.perms.items()}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="permsparse.pipeline.blockwise.engine"):
        optimize(src, tmp_path / "c.onnx", OptimizeConfig(workers=1, progress=False, work_dir=str(tmp_path / "wd"),
                                                          finetune_epochs=1, calib_samples=8, damp=0.05))
    assert "resuming" not in caplog.text and "block 0:" in caplog.text


@pytest.mark.slow
def test_sigkill_half_way_then_resume(exported, tmp_path):
    """``optimize --work-dir`` killed with SIGKILL after half of its blocks: the rerun restores those blocks (it
    recomputes only the rest) and writes what an uninterrupted run writes (issue 17, point 4)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    src = exported("llama", "legacy")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-m", "permsparse.cli", "optimize", str(src), "--calib-samples", "8", "--finetune-epochs",
            "1", "--workers", "1"]
    ref = tmp_path / "ref.onnx"
    subprocess.run([*args, "-o", str(ref), "-q"], check=True, env=env, timeout=600, capture_output=True)
    wd, out = tmp_path / "wd", tmp_path / "out.onnx"
    proc = subprocess.Popen([*args, "-o", str(out), "--work-dir", str(wd), "-q"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        done = 0
        while done < 2 and proc.poll() is None and time.monotonic() < deadline:
            for state in wd.glob("blocks/*/state.json"):
                try:
                    done = json.loads(state.read_text())["done"]
                except (OSError, ValueError, KeyError):
                    pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed half-way"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert 2 <= done < 4 and not out.exists()
    res = subprocess.run([*args, "-o", str(out), "--work-dir", str(wd), "-v"], env=env, timeout=600, check=False,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = [ln for ln in res.stderr.splitlines() if "resuming after block" in ln]
    assert resumed and int(resumed[0].split("resuming after block ")[1].split()[0]) >= 2, res.stderr[-2000:]
    assert "block 0:" not in res.stderr and "block 3:" in res.stderr
    assert sha256(out) == sha256(ref)
