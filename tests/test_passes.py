"""Analysis, fold, sparsify and verify passes on real exported graphs (both exporters)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import EXPORTERS, MODELS

from permsparse.ir.inputs import concrete_shapes as resolve_shapes
from permsparse.ir.inputs import random_feeds
from permsparse.passes.analysis import analyze
from permsparse.passes.fold import Unit, apply_fold, plan_units
from permsparse.passes.names import name_nodes
from permsparse.passes.probe import probe
from permsparse.passes.sparsify import apply_masks, nm_report
from permsparse.passes.verify import check_equivalent
from permsparse.pattern import NMPattern, check_nm

RTOL = 1e-4


def _plan(path):
    model = onnx.load(str(path))
    pr = probe(model, random_feeds(model, resolve_shapes(model)))
    graph = gs.import_onnx(model)
    name_nodes(graph)
    return model, graph, analyze(graph, pr)


def _feeds(model):
    return [random_feeds(model, resolve_shapes(model, batch=2, seq=s), seed=s) for s in (5, 11)]


def _roles(closure, plan):
    """Which weights' rows/cols are members of ``closure``, by weight node name."""
    by_const = {w.const: w.name for w in plan.weights.values()}
    rows = sorted(by_const[mb.const] for mb in closure.members if mb.role == "rows" and mb.const in by_const)
    cols = sorted(by_const[mb.const] for mb in closure.members if mb.role == "cols" and mb.const in by_const)
    return rows, cols


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_minilm_closures(exported, exporter):
    _, _, plan = _plan(exported("minilm", exporter))
    assert len(plan.weights) == 36
    assert all(w.prunable for w in plan.weights.values())
    shapes = sorted((w.k, w.n) for w in plan.weights.values())
    assert shapes.count((384, 384)) == 24 and shapes.count((384, 1536)) == 6 and shapes.count((1536, 384)) == 6
    heads = [c for c in plan.closures if c.block == 32]
    mlp = [c for c in plan.closures if c.k == 1536]
    residual = [c for c in plan.closures if len(c.siblings) == 24]
    assert len(heads) == 6 and len(mlp) == 6 and len(residual) == 1
    for c in heads:  # O-projection folds into V with one permutation per head (block 32, 12 classes)
        assert c.foldable and c.n_classes == 12 and len(c.siblings) == 1
        rows, cols = _roles(c, plan)
        assert len(rows) == 1 and len(cols) == 1
        assert any(mb.role == "param" for mb in c.members)  # V's bias
    for c in mlp:  # down-projection folds into up-projection (+ its bias)
        assert c.foldable and c.block == 1536 and len(c.siblings) == 1
        rows, cols = _roles(c, plan)
        assert plan.weights[rows[0]].k == 1536 and plan.weights[cols[0]].n == 1536
    res = residual[0]
    assert len(res.groups) == 12 and not res.foldable
    assert [b.reason for b in res.boundaries] == ["graph output 'last_hidden_state'"]
    assert sum(mb.role == "table" for mb in res.members) == 3  # word, position, token-type embeddings


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_llama_closures(exported, exporter):
    _, _, plan = _plan(exported("llama", exporter))
    lm_head = [w for w in plan.weights.values() if w.head]
    assert len(lm_head) == 1 and not lm_head[0].prunable
    heads = [c for c in plan.closures if c.block < c.k or c.k < 64]
    assert len(heads) == 2
    for c in heads:  # GQA: 4 query heads share 2 KV heads -> O rows map onto 2 tied classes of head_dim 16
        assert c.foldable and c.block == 16 and c.n_classes == 2 and c.k == 32
        o_rows = next(mb for mb in c.members if mb.role == "rows")
        assert list(o_rows.block_map) == [0, 0, 1, 1]
    mlp = [c for c in plan.closures if c.k == 128]
    for c in mlp:  # down folds into gate and up
        rows, cols = _roles(c, plan)
        assert len(rows) == 1 and len(cols) == 2 and c.foldable
    res = max(plan.closures, key=lambda c: len(c.siblings))
    assert res.foldable  # absorbed by the embedding table and lm_head
    assert len(res.groups) == 5  # (q,k,v) and (gate,up) per layer, plus lm_head


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_vit_closures(exported, exporter):
    _, _, plan = _plan(exported("vit", exporter))
    res = max(plan.closures, key=lambda c: len(c.siblings))
    assert not res.foldable
    assert any("Transpose moves the channel axis" in b.reason for b in res.boundaries)  # after the conv stem
    heads = [c for c in plan.closures if c.block == 16]
    assert len(heads) == 2 and all(c.foldable and c.n_classes == 4 for c in heads)


EXPECTED_GATHERS = {
    ("minilm", "fold"): 0, ("minilm", "global"): 1, ("minilm", "local"): 12,
    ("vit", "fold"): 0, ("vit", "global"): 1, ("vit", "local"): 4,
    ("llama", "fold"): 0, ("llama", "global"): 0, ("llama", "local"): 4,
}


@pytest.mark.parametrize("policy", ("fold", "global", "local"))
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", MODELS)
def test_random_permutations_fold_exactly(exported, name, exporter, policy):
    """Any constraint-respecting permutation, folded, leaves the function unchanged (fp32, rtol 1e-4)."""
    model, graph, plan = _plan(exported(name, exporter))
    units = plan_units(plan, policy)
    rng = np.random.default_rng(0)
    perms = {
        u.name: np.concatenate([rng.permutation(u.block) + i * u.block for i in range(u.k // u.block)])
        for u in units.units
    }
    result = apply_fold(graph, plan, units.units, perms)
    assert len(result.gathers) == units.gathers_planned == EXPECTED_GATHERS[(name, policy)]
    out = gs.export_onnx(graph)
    onnx.checker.check_model(out)
    eq = check_equivalent(model, out, _feeds(model), rtol=RTOL)
    assert eq.ok, eq
    # the permutation really changed weights (a no-op fold would pass the check too)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    changed = [k for k in before if k in after and not np.array_equal(before[k], after[k])]
    assert len(changed) >= len(units.units)


def test_corrupted_fold_is_caught(exported):
    """The equivalence check fails when one member is left out of the fold."""
    model, graph, plan = _plan(exported("minilm", "legacy"))
    units = plan_units(plan, "fold")
    unit = next(u for u in units.units if plan.closures[u.closure].block == 1536)
    closure = plan.closures[unit.closure]
    closure.members = [mb for mb in closure.members if mb.role != "param"]  # forget the bias
    perm = np.random.default_rng(1).permutation(unit.k)
    apply_fold(graph, plan, [unit], {unit.name: perm})
    eq = check_equivalent(model, gs.export_onnx(graph), _feeds(model), rtol=RTOL)
    assert not eq.ok and eq.max_rel_error > 1e-2


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
def test_masks_are_nm_along_k(exported, pattern):
    n, m = pattern
    model = onnx.load(str(exported("minilm", "legacy")))
    pr = probe(model, random_feeds(model, resolve_shapes(model)))
    graph = gs.import_onnx(model)
    name_nodes(graph)
    plan = analyze(graph, pr, pattern=NMPattern(n, m))
    stats = apply_masks(graph, plan, list(plan.weights))
    assert all(abs(s.density - n / m) < 1e-3 for s in stats)
    assert all(nm_report(graph, plan).values())
    assert all(0.5 < s.kept_magnitude < 1.0 for s in stats)


def test_check_nm_by_hand():
    w = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])  # K=4 rows, N=2 columns
    assert check_nm(w, 0, 2, 4)
    w[3, 0] = 5.0  # column 0 now has 3 non-zeros in its group of 4
    assert not check_nm(w, 0, 2, 4)
    assert check_nm(w.T, 1, 3, 4)
    assert not check_nm(np.ones((6, 2)), 0, 2, 4)  # K not divisible by M


def _assert_same_probe(static, ran):
    assert static is not None and static.method == "static shape inference"
    assert {k: v for k, v in ran.shapes.items() if k in static.shapes} == {k: static.shapes[k] for k in ran.shapes
                                                                          if k in static.shapes}
    assert set(ran.shapes) <= set(static.shapes)
    for k, v in static.values.items():
        if k in ran.values:
            np.testing.assert_array_equal(v, ran.values[k])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_static_probe_agrees_with_onnxruntime(exported, name, exporter):
    """Shapes (and the integers the rules read) from static inference equal those of an onnxruntime run."""
    from permsparse.passes.probe import static_probe

    model = onnx.load(str(exported(name, exporter)))
    feeds = random_feeds(model, resolve_shapes(model))
    static = static_probe(model, feeds)
    if static is None:
        pytest.skip(f"static inference does not resolve {name}/{exporter}; the onnxruntime probe is used")
    _assert_same_probe(static, probe(model, feeds))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_static_probe_on_external_weights_reads_no_weight(tmp_path, dtype):
    """An LLM with every weight in external data gets its shapes statically (the 7B path never runs the model for
    shapes); the data file is not even needed."""
    from permsparse.models.synthetic import write_llama
    from permsparse.passes.probe import static_probe

    path = write_llama(tmp_path / "m.onnx", layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256,
                       dtype=dtype)
    model = onnx.load(str(path), load_external_data=False)
    feeds = random_feeds(model, resolve_shapes(model))
    ran = probe(model, feeds, base_dir=tmp_path)
    (tmp_path / "m.onnx.data").rename(tmp_path / "elsewhere.data")
    _assert_same_probe(static_probe(model, feeds), ran)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2), (2, 16)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_keep_mask_equals_a_stable_sort(n, m, dtype):
    """The comparison-counting mask keeps exactly what a stable descending sort keeps: ties go to the first row,
    NaN is least important (many ties on purpose)."""
    from permsparse.pattern import nm_keep_mask

    def by_sort(x):
        g = np.where(np.isnan(x), -np.inf, x).reshape(x.shape[0] // m, m, x.shape[1])
        keep = np.zeros(g.shape, dtype=bool)
        np.put_along_axis(keep, np.argsort(-g, axis=1, kind="stable")[:, :n, :], True, axis=1)
        return keep.reshape(x.shape)

    rng = np.random.default_rng(n * 100 + m)
    for x in (rng.integers(0, 3, (m * 50, 37)).astype(dtype), rng.standard_normal((m * 64, 33)).astype(dtype)):
        x[0, 0] = np.nan
        keep = nm_keep_mask(x, n, m)
        np.testing.assert_array_equal(keep, by_sort(x))
        assert (keep.reshape(-1, m, x.shape[1]).sum(axis=1) == n).all()


# ------------------------------------------------------------------------------------------- the rules table, rule by rule

_RNG = np.random.default_rng(3)


def _c(name: str, arr) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(arr), name)


def _rule_model(body: list, extra_inits: list, b_name: str, k2: int, extra_inputs=()) -> onnx.ModelProto:
    """X[2,4,16] @ W1[16,16] = A; ``body`` computes ``b_name`` from A; Y = B @ W2[k2, 8]."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("MatMul", ["X", "W1"], ["A"], name="mm1"), *body,
             helper.make_node("MatMul", [b_name, "W2"], ["Y"], name="mm2")]
    inits = [_c("W1", _RNG.standard_normal((16, 16)).astype(np.float32)),
             _c("W2", _RNG.standard_normal((k2, 8)).astype(np.float32)), *extra_inits]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4, 16]), *extra_inputs]
    graph = helper.make_graph(nodes, "rule", inputs, [helper.make_empty_tensor_value_info("Y")],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _n(op, ins, outs, **attrs):
    from onnx import helper

    return helper.make_node(op, ins, outs, name=f"{op}_{outs[0]}", **attrs)


_F = np.float32
RULE_CASES = [
    # id, body, extra initializers, tensor read by W2, W2's K, expected free, a word of the boundary reason
    ("unary", [_n("Relu", ["A"], ["B"])], [], "B", 16, True, None),
    ("bias-add", [_n("Add", ["A", "bias"], ["B"])], [_c("bias", _RNG.standard_normal(16).astype(_F))], "B", 16, True,
     None),
    ("scalar-mul", [_n("Mul", ["A", "s"], ["B"])], [_c("s", np.array(0.5, _F))], "B", 16, True, None),
    ("two-activations-swiglu", [_n("Sigmoid", ["A"], ["S"]), _n("Mul", ["A", "S"], ["B"])], [], "B", 16, True, None),
    ("layernorm", [_n("LayerNormalization", ["A", "g", "b"], ["B"])],
     [_c("g", _RNG.standard_normal(16).astype(_F)), _c("b", _RNG.standard_normal(16).astype(_F))], "B", 16, True, None),
    ("softmax-last-axis", [_n("Softmax", ["A"], ["B"], axis=-1)], [], "B", 16, True, None),
    ("reduce-over-channels", [_n("ReduceMean", ["A", "ax"], ["M"]), _n("Sub", ["A", "M"], ["B"])],
     [_c("ax", np.array([-1], np.int64))], "B", 16, True, None),
    ("head-reshape", [_n("Reshape", ["A", "s4"], ["H"]), _n("Relu", ["H"], ["H2"]), _n("Reshape", ["H2", "s3"], ["B"])],
     [_c("s4", np.array([2, 4, 4, 4], np.int64)), _c("s3", np.array([2, 4, 16], np.int64))], "B", 16, True, None),
    ("transpose-keeps-channels", [_n("Transpose", ["A"], ["T"], perm=[1, 0, 2]),
                                  _n("Transpose", ["T"], ["B"], perm=[1, 0, 2])], [], "B", 16, True, None),
    ("concat-other-axis", [_n("Concat", ["A", "A"], ["B"], axis=1)], [], "B", 16, True, None),
    ("slice-other-axis", [_n("Slice", ["A", "st", "en", "ax"], ["B"])],
     [_c("st", np.array([1], np.int64)), _c("en", np.array([3], np.int64)), _c("ax", np.array([1], np.int64))],
     "B", 16, True, None),
    ("gather-other-axis", [_n("Gather", ["A", "idx"], ["B"], axis=1)], [_c("idx", np.array([3, 0], np.int64))],
     "B", 16, True, None),
    ("split-other-axis", [_n("Split", ["A", "sp"], ["B", "B2"], axis=1)], [_c("sp", np.array([1, 3], np.int64))],
     "B", 16, True, None),
    ("shape-read-is-neutral", [_n("Relu", ["A"], ["R"]), _n("Shape", ["A"], ["S"]), _n("Reshape", ["R", "S"], ["B"])],
     [], "B", 16, True, None),
    # cuts of a fused projection's output: each part folds into its columns of W1 (and of a bias)
    ("fused-projection-slice", [_n("Slice", ["A", "st", "en", "ax"], ["B"])],
     [_c("st", np.array([0], np.int64)), _c("en", np.array([8], np.int64)), _c("ax", np.array([-1], np.int64))],
     "B", 8, True, None),
    ("fused-projection-split", [_n("Split", ["A", "sp"], ["B", "B2"], axis=-1)], [_c("sp", np.array([8, 8], np.int64))],
     "B", 8, True, None),
    ("fused-gate-up", [_n("Split", ["A"], ["G", "U"], axis=-1, num_outputs=2), _n("Sigmoid", ["G"], ["S"]),
                       _n("Mul", ["G", "S"], ["GS"]), _n("Mul", ["GS", "U"], ["B"])], [], "B", 8, True, None),
    ("fused-bias-reshape-split", [_n("Add", ["A", "bias"], ["Ab"]), _n("Reshape", ["Ab", "s2"], ["R"]),
                                  _n("Split", ["R", "sp"], ["B2", "B"], axis=-1)],
     [_c("bias", _RNG.standard_normal(16).astype(_F)), _c("s2", np.array([8, 16], np.int64)),
      _c("sp", np.array([8, 8], np.int64))], "B", 8, True, None),
    ("fused-qkv-heads", [_n("Split", ["A", "sp3"], ["q", "k", "v"], axis=-1),
                         _n("Reshape", ["q", "hq"], ["q4"]), _n("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
                         _n("Reshape", ["k", "hq"], ["k4"]), _n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
                         _n("MatMul", ["qh", "kt"], ["sc"]), _n("Softmax", ["sc"], ["pr"], axis=-1),
                         _n("Reshape", ["v", "hv"], ["v4"]), _n("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
                         _n("MatMul", ["pr", "vh"], ["o"]), _n("Transpose", ["o"], ["o4"], perm=[0, 2, 1, 3]),
                         _n("Reshape", ["o4", "s8"], ["B"])],
     [_c("sp3", np.array([4, 4, 8], np.int64)), _c("hq", np.array([2, 4, 2, 2], np.int64)),
      _c("hv", np.array([2, 4, 2, 4], np.int64)), _c("s8", np.array([2, 4, 8], np.int64))], "B", 8, True, None),
    # GPT-NeoX layout: per-head [q|v] after a head reshape, cut along the channel axis: V's columns differ by head
    ("fused-heads-then-split", [_n("Reshape", ["A", "h4"], ["A4"]), _n("Split", ["A4", "sp"], ["q", "v"], axis=-1),
                                _n("Relu", ["q"], ["q2"]), _n("Mul", ["v", "q2"], ["o"]), _n("Reshape", ["o", "s8"], ["B"])],
     [_c("h4", np.array([2, 4, 2, 8], np.int64)), _c("sp", np.array([4, 4], np.int64)),
      _c("s8", np.array([2, 4, 8], np.int64))], "B", 8, True, None),
    # timm layout: qkv reshaped to [B, S, parts, heads, head_dim], parts moved first and taken apart by Gather
    ("fused-unbind-heads", [_n("Reshape", ["A", "h5"], ["A5"]), _n("Transpose", ["A5"], ["AT"], perm=[2, 0, 3, 1, 4]),
                            _n("Gather", ["AT", "i0"], ["q"], axis=0), _n("Gather", ["AT", "i1"], ["v"], axis=0),
                            _n("Transpose", ["q"], ["kt"], perm=[0, 1, 3, 2]), _n("MatMul", ["q", "kt"], ["sc"]),
                            _n("Softmax", ["sc"], ["pr"], axis=-1), _n("MatMul", ["pr", "v"], ["o"]),
                            _n("Transpose", ["o"], ["o4"], perm=[0, 2, 1, 3]), _n("Reshape", ["o4", "s8"], ["B"])],
     [_c("h5", np.array([2, 4, 2, 2, 4], np.int64)), _c("i0", np.array(0, np.int64)), _c("i1", np.array(1, np.int64)),
      _c("s8", np.array([2, 4, 8], np.int64))], "B", 8, True, None),
    ("channel-slice-of-a-tensor-read-whole", [_n("ReduceMean", ["A", "ax"], ["M"]),
                                              _n("Slice", ["A", "st", "en", "ax"], ["S"]), _n("Add", ["S", "M"], ["B"])],
     [_c("st", np.array([0], np.int64)), _c("en", np.array([8], np.int64)), _c("ax", np.array([-1], np.int64))],
     "B", 8, False, "read whole by ReduceMean"),
    ("channel-slices-overlap", [_n("Slice", ["A", "st", "en", "ax"], ["S"]), _n("Slice", ["A", "st2", "en2", "ax"], ["T"]),
                                _n("Add", ["S", "T"], ["B"])],
     [_c("st", np.array([0], np.int64)), _c("en", np.array([8], np.int64)), _c("ax", np.array([-1], np.int64)),
      _c("st2", np.array([4], np.int64)), _c("en2", np.array([12], np.int64))], "B", 8, False, "overlaps another"),
    ("channel-slice-of-an-activation-sum", [_n("Add", ["A", "X"], ["Z"]), _n("Slice", ["Z", "st", "en", "ax"], ["B"])],
     [_c("st", np.array([0], np.int64)), _c("en", np.array([8], np.int64)), _c("ax", np.array([-1], np.int64))],
     "B", 8, False, "not by a constant-weight MatMul"),
    ("gather-channel-axis-of-a-projection", [_n("Gather", ["A", "idx"], ["B"], axis=-1)],
     [_c("idx", np.arange(16)[::-1].copy().astype(np.int64))], "B", 16, True, None),
    ("gather-channel-axis", [_n("Add", ["A", "X"], ["Z"]), _n("Gather", ["Z", "idx"], ["B"], axis=-1)],
     [_c("idx", np.arange(16)[::-1].copy().astype(np.int64))], "B", 16, False, "Gather along the channel axis"),
    ("broadcast-along-channels", [_n("Add", ["A", "col"], ["B"])], [_c("col", _RNG.standard_normal((4, 1)).astype(_F))],
     "B", 16, True, None),
    ("unknown-op-blocks", [_n("Hardmax", ["A"], ["B"], axis=-1)], [], "B", 16, False, "not known to commute"),
]


@pytest.mark.parametrize(("body", "inits", "b_name", "k2", "free", "why"), [c[1:] for c in RULE_CASES],
                         ids=[c[0] for c in RULE_CASES])
def test_rule_by_rule(tmp_path, body, inits, b_name, k2, free, why):
    """Each rule of the rules table on a two-MatMul graph: W2's input closure folds for free (it reaches W1's
    columns through the op) or is blocked with the rule's reason; a random permutation of every free unit, folded,
    leaves the function unchanged; the fused weight W1's rows (its input) always get one permutation for all parts."""
    model = onnx.shape_inference.infer_shapes(_rule_model(body, inits, b_name, k2))
    path = tmp_path / "rule.onnx"
    onnx.save(model, str(path))
    model, graph, plan = _plan(path)
    w2 = next(w for w in plan.weights.values() if w.const == "W2")
    c = plan.closure_of(w2.name)
    assert c.foldable == free, c.describe()
    if free:
        assert any(mb.const == "W1" and mb.role == "cols" for mb in c.members)
        w1 = [mb for mb in c.members if mb.const == "W1" and mb.role == "cols"]
        if k2 < 16:  # W2 reads a part of the fused projection W1: only that part's columns of W1 are members
            assert all(mb.part is not None and mb.part.size == k2 for mb in w1), w1
        else:  # all of W1's columns (a Gather along the channel axis reorders them all: one part of 16)
            assert all(mb.part is None or sorted(mb.part.ravel().tolist()) == list(range(16)) for mb in w1), w1
    else:
        assert why in c.describe()
    w1 = next(w for w in plan.weights.values() if w.const == "W1")
    assert plan.closure_of(w1.name).problem is None
    # every closure that folds for free, prunable or not (W2 writes the graph output, so it is a head), gets a
    # random permutation within its blocks; folded, the function is unchanged
    units = [Unit(f"closure{cl.id}", cl.id, None, tuple(cl.siblings), cl.k, cl.block) for cl in plan.closures
             if cl.foldable]
    assert (c in [plan.closures[u.closure] for u in units]) == free
    rng = np.random.default_rng(0)
    perms = {u.name: np.concatenate([rng.permutation(u.block) + i * u.block for i in range(u.k // u.block)])
             for u in units}
    assert all(not np.array_equal(p, np.arange(len(p))) for p in perms.values())
    apply_fold(graph, plan, units, perms)
    out = gs.export_onnx(graph)
    eq = check_equivalent(model, out, [random_feeds(model, resolve_shapes(model), seed=1)], rtol=RTOL)
    assert eq.ok, eq


@pytest.mark.parametrize("shared", ["bias", "weight"])
def test_fused_part_of_a_shared_constant_blocks(tmp_path, shared):
    """A fused projection's part folds into its columns only when no other node reads the constants it would permute
    (the legacy exporter shares equal initializers): with the bias (or the weight) also read by a second projection
    whose output is a graph output, the part's closure is blocked, and every closure that does fold keeps the function
    (both outputs) unchanged."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("MatMul", ["X", "W1"], ["A0"], name="mm1"),
             helper.make_node("Add", ["A0", "bias"], ["A"], name="bias1"),
             helper.make_node("Split", ["A", "sp"], ["P", "Q"], name="split", axis=-1),
             helper.make_node("MatMul", ["P", "W2"], ["Y"], name="mm2"),
             helper.make_node("MatMul", ["X", "W1" if shared == "weight" else "W3"], ["Z0"], name="mm3"),
             helper.make_node("Add", ["Z0", "bias" if shared == "bias" else "bias3"], ["Z"], name="bias3")]
    inits = [_c("W1", _RNG.standard_normal((16, 16)).astype(_F)), _c("W2", _RNG.standard_normal((8, 8)).astype(_F)),
             _c("W3", _RNG.standard_normal((16, 16)).astype(_F)), _c("bias", _RNG.standard_normal(16).astype(_F)),
             _c("bias3", _RNG.standard_normal(16).astype(_F)), _c("sp", np.array([8, 8], np.int64))]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4, 16])],
                              [helper.make_empty_tensor_value_info("Y"), helper.make_empty_tensor_value_info("Z")],
                              initializer=inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                                                ir_version=10))
    path = tmp_path / "shared.onnx"
    onnx.save(model, str(path))
    model, graph, plan = _plan(path)
    c = plan.closure_of(next(w.name for w in plan.weights.values() if w.const == "W2"))
    assert not c.foldable and "shared with other nodes" in c.describe(), c.describe()
    units = [Unit(f"closure{cl.id}", cl.id, None, tuple(cl.siblings), cl.k, cl.block) for cl in plan.closures
             if cl.foldable]
    rng = np.random.default_rng(0)
    perms = {u.name: np.concatenate([rng.permutation(u.block) + i * u.block for i in range(u.k // u.block)])
             for u in units}
    apply_fold(graph, plan, units, perms)
    eq = check_equivalent(model, gs.export_onnx(graph), [random_feeds(model, resolve_shapes(model), seed=1)],
                          rtol=RTOL)
    assert eq.ok, eq
