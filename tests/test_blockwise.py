"""The default path of `optimize`: block-wise calibration, SparseGPT reconstruction, tuning, the joint block learner
and the block-by-block fold check, end to end on exported models (both exporters), checked on onnxruntime."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import EXPORTERS, sha256
from onnx import TensorProto, helper, numpy_helper

from permsparse.cli import main
from permsparse.data.feeds import make_feeds
from permsparse.data.metrics import evaluate_drift
from permsparse.pattern import check_nm
from permsparse.pipeline import optimize
from permsparse.pipeline.config import OptimizeConfig


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _output_error(dense: Path, sparse: Path) -> float:
    """Relative output error of ``sparse`` against ``dense`` on held-out text (the calibration split is disjoint)."""
    feeds = make_feeds(dense, None, samples=16, batch_size=8, seq_len=64, seed=1, split="heldout")
    return evaluate_drift(dense, sparse, feeds, progress=False)["rel_error"]


def _n_valid(path: Path) -> int:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mats = [inits[n.input[1]] for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and inits[n.input[1]].ndim == 2]
    return sum(check_nm(w, 0, 2, 4) for w in mats)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_defaults_reconstruct_block_by_block_and_beat_plain_masking(exported, tmp_path, exporter):
    """No flags: Wanda calibration, lsa permutations, SparseGPT block by block; exact fold; all masks 2:4; and the
    output error is well below plain Wanda 2:4 on the same model."""
    src = exported("llama", exporter)
    before = sha256(src)
    res = optimize(src, tmp_path / "d.onnx", OptimizeConfig(progress=False))
    cfg = res.config
    assert (cfg.permutation.method, cfg.mask.importance, cfg.reconstruction.method, cfg.reconstruction.sequential) == ("lsa", "wanda", "sparsegpt", True)
    assert "block-wise" in res.timings and res.equivalence.ok and res.equivalence.max_rel_error < 1e-4
    assert sum(res.nm_valid.values()) == len(res.selected) == 14 and _n_valid(tmp_path / "d.onnx") == 14
    assert len(res.block_reports) == 4  # attention and MLP of each of the 2 decoder layers (cut at each residual)
    plain = optimize(src, tmp_path / "p.onnx", OptimizeConfig(method="identity", reconstruct="none", progress=False))
    assert sum(plain.nm_valid.values()) == 14
    err_default, err_plain = _output_error(src, tmp_path / "d.onnx"), _output_error(src, tmp_path / "p.onnx")
    assert err_default < 0.8 * err_plain, (err_default, err_plain)
    assert sha256(src) == before


def test_vit_defaults_and_block_check(exported, tmp_path):
    """ViT (image input, Conv stem outside the blocks): the default path and the block-by-block fold check."""
    src = exported("vit", "dynamo")
    res = optimize(src, tmp_path / "v.onnx", OptimizeConfig(check="blocks", progress=False))
    assert res.equivalence.ok and "block" in res.equivalence.method
    assert len(res.selected) > 0 and sum(res.nm_valid.values()) == len(res.selected)
    assert _n_valid(tmp_path / "v.onnx") == len(res.selected)


def test_tuning_and_joint_block_learner_keep_the_fold_exact(exported, tmp_path):
    src = exported("llama", "legacy")
    # calibration pinned to the old 32 windows: tuning time grows with the windows, and this test is about the fold
    tuned = optimize(src, tmp_path / "t.onnx", OptimizeConfig(finetune_epochs=1, finetune_lr=1e-4, calib_samples=32,
                                                              progress=False))
    assert tuned.equivalence.ok and sum(tuned.nm_valid.values()) == 14
    joint = optimize(src, tmp_path / "j.onnx", OptimizeConfig(objective="block", block_steps=3, reconstruct="none",
                                                              calib_samples=32, progress=False))
    assert joint.equivalence.ok and sum(joint.nm_valid.values()) == 14
    assert _n_valid(tmp_path / "j.onnx") == 14


def _no_blocks(path: Path) -> Path:
    """x -> MatMul(w1) -> Relu -> MatMul(w2) -> MatMul(head): weights but no residual stream, hence no blocks."""
    rng = np.random.default_rng(0)
    w1, w2, w3 = (rng.standard_normal(s).astype(np.float32) for s in ((16, 32), (32, 16), (16, 8)))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["g"]), helper.make_node("MatMul", ["g", "w3"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])],
                              initializer=[numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_model_without_blocks(tmp_path, capsys, caplog):
    """A model with neither token ids nor images and no blocks: the defaults fall back to magnitude masking with a
    warning; an explicit --reconstruct sparsegpt is a clear error and writes nothing."""
    src = _no_blocks(tmp_path / "mlp.onnx")
    with caplog.at_level(logging.WARNING, logger="permsparse"):
        res = optimize(src, tmp_path / "o.onnx", OptimizeConfig(progress=False))
    assert (res.config.mask.importance, res.config.reconstruction.method) == ("magnitude", "none")
    assert "cannot tell what data this model takes" in caplog.text and "Falling back" in caplog.text
    assert _n_valid(tmp_path / "o.onnx") == 2  # w1, w2 (w3 writes the graph output)
    code = main(["optimize", str(src), "-o", str(tmp_path / "x.onnx"), "--reconstruct", "sparsegpt", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "no Transformer blocks found" in err and "--reconstruct none" in err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(("name", "exporter"), [("llama", "dynamo"), ("llama", "legacy"), ("minilm", "dynamo")])
def test_block_by_block_calibration_equals_onnxruntime(exported, tmp_path, name, exporter):
    """Big models are calibrated block by block (--check blocks); the Wanda norms equal the whole-model onnxruntime
    calibration's (padding excluded for MiniLM's masked batches), so the masks are the same."""
    src = exported(name, exporter)
    cfg = {"method": "identity", "importance": "wanda", "reconstruct": "none", "calib_samples": 12,
           "calib_seq_len": 24}
    whole = optimize(src, tmp_path / "whole.onnx", OptimizeConfig(**cfg, check="whole"))
    blocks = optimize(src, tmp_path / "blocks.onnx", OptimizeConfig(**cfg, check="blocks"))
    assert "block" in blocks.equivalence.method and "block" not in whole.equivalence.method
    assert whole.x_norms.keys() == blocks.x_norms.keys() and len(whole.x_norms) >= 4
    for k, v in whole.x_norms.items():
        np.testing.assert_allclose(blocks.x_norms[k], v, rtol=2e-4, atol=1e-6 * float(np.max(v)), err_msg=k)
    a, b = (onnx.load(str(tmp_path / f)) for f in ("whole.onnx", "blocks.onnx"))
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    masked = [k for k, v in wa.items() if v.ndim == 2 and v.size >= 1024 and (v == 0).mean() >= 0.5]
    same = np.mean([np.mean((wa[k] != 0) == (wb[k] != 0)) for k in masked])
    assert masked and same > 0.999, same  # only float near-ties may pick another entry
