"""Issue 17 (cli-core): every policy × reconstruction on both exporters, 16-bit models, block-wise resume, names."""

from __future__ import annotations

import onnx
import pytest
from conftest import EXPORTERS, sha256
from onnx import numpy_helper

from permsparse.config import OptimizeConfig
from permsparse.pattern import check_nm
from permsparse.pipeline import optimize


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
    assert res.config.policy == policy and res.config.reconstruct == reconstruct
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
