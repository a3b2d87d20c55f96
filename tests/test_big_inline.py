"""Inputs whose weights lie inside the .onnx file but are big: read lazily from the file, checked block by block,
written back as one file, one tensor at a time — with the same result as the in-memory route."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from permsparse.ir.external import uses_external_data
from permsparse.pipeline import optimize, read
from permsparse.pipeline.config import OptimizeConfig


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("options", [dict(), dict(reconstruct="none", objective="importance", finetune_epochs=0,
                                                  sequential=False, calib_samples=8)],
                         ids=["defaults", "per-weight"])
def test_big_inline_model_takes_the_lazy_route_with_the_same_output(exported, tmp_path, monkeypatch, options):
    src = exported("llama", "legacy")
    assert not uses_external_data(onnx.load(str(src), load_external_data=False))
    before = src.read_bytes()
    cfg = OptimizeConfig(progress=False, seed=0, **options)
    ref = optimize(src, tmp_path / "ref.onnx", cfg)
    monkeypatch.setattr(read, "WHOLE_CHECK_MAX_BYTES", 10_000)  # the tiny model counts as big
    source = read.load(src, None)
    assert source.external and source.inline
    big = optimize(src, tmp_path / "big.onnx", cfg)
    assert src.read_bytes() == before  # the input is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".json") == ["big.onnx", "ref.onnx"]  # one file
    assert big.equivalence.method.startswith("block by block") and ref.equivalence.method.startswith("whole")
    assert big.equivalence.ok and all(big.nm_valid.values()) and big.nm_valid.keys() == ref.nm_valid.keys()
    a, b = _weights(tmp_path / "ref.onnx"), _weights(tmp_path / "big.onnx")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
