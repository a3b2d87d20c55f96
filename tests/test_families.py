"""The family matrix: seeded tiny models of every Transformer family users export (``models/families.py``), with
both torch exporters. For each: one block partition layer per Transformer layer, every prunable weight in a
closure and inside a block, the side tensors computable without any weight, permutations that fold under policy
``fold`` with no Gather and an exact fold check, valid 2:4 masks; and the block-wise defaults end to end.

Legacy exports take about a second each, dynamo exports 4-12 s: the structural checks of legacy exports run in CI,
the dynamo ones and most end-to-end runs are marked slow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from permsparse.models.families import FAMILIES

LAYERS = 3
ENCODERS = {"bert", "roberta", "distilbert", "vit", "deit", "clip-text", "clip-vision"}
#: closures that do not fold for free, per family, and why (everything else folds with nothing added):
#: an encoder's residual stream leaves the graph as ``last_hidden_state`` (a graph output). A fused projection's
#: output cut along the channel axis (Phi-3's qkv_proj Slice and gate_up_proj Split/Slice, GPT-2's c_attn Split) does
#: not block: the O-proj/down-proj input closures fold into the matching part of the fused columns (and bias).
BLOCKED = {f: 1 for f in ENCODERS}
#: parts of fused projections' columns that are closure members: Phi-3's V part of qkv_proj and the gate and up
#: parts of gate_up_proj, GPT-2's V part of c_attn (the same part of its bias is a member too, as a parameter)
FUSED_PARTS = {"phi3": 3 * LAYERS, "gpt2": LAYERS}
FAST_FOLD = ("llama", "gemma3", "phi3", "gpt2", "bert", "vit", "clip-text")
FAST_DEFAULTS = ("gemma3",)


def _params(fast: tuple[str, ...] | None = None) -> list:
    out = []
    for name in FAMILIES:
        for exporter in ("legacy", "dynamo"):
            slow = exporter == "dynamo" or (fast is not None and name not in fast)
            out.append(pytest.param(name, exporter, id=f"{name}-{exporter}",
                                    marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    cache: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("families")

    def get(name: str, exporter: str) -> Path:
        from permsparse.errors import PermsparseError
        from permsparse.models.families import build_family

        if (name, exporter) not in cache:
            try:
                cache[(name, exporter)] = build_family(name, exporter, root / f"{name}-{exporter}.onnx", layers=LAYERS)
            except PermsparseError as exc:  # an exporter that cannot export this family with this torch/transformers
                pytest.skip(f"{name} does not export with the {exporter} exporter here: {exc}")
        return cache[(name, exporter)]

    return get


def _analyzed(path: Path):
    from permsparse.ir.graph import import_graph
    from permsparse.ir.inputs import concrete_shapes, random_feeds
    from permsparse.ir.model import load_model
    from permsparse.ir.weights import node_scopes
    from permsparse.passes.analysis import analyze
    from permsparse.passes.blocks import partition
    from permsparse.passes.names import name_nodes
    from permsparse.passes.probe import probe

    model = load_model(path)
    pr = probe(model, random_feeds(model, concrete_shapes(model, None)), base_dir=path.parent)
    graph = import_graph(model, path.parent)
    name_nodes(graph)
    plan = analyze(graph, pr, scopes=node_scopes(model))
    return model, graph, plan, partition(graph, plan)


@pytest.mark.parametrize("name,exporter", _params())
def test_family_blocks_and_closures(family_model, name, exporter):
    from permsparse.torchgraph.subgraph import ModelIndex

    path = family_model(name, exporter)
    model, graph, plan, bp = _analyzed(path)
    assert bp is not None, f"{name}: no blocks"
    assert len(bp.layers()) == LAYERS, [(b.index, b.input, b.attention) for b in bp.blocks]
    assert len(bp.blocks) == 2 * LAYERS  # the attention and the MLP half of every layer
    assert bp.outside == []
    assert all(len(layer) == 2 and bp.blocks[layer[0]].attention for layer in bp.layers())
    # every prunable weight is in a closure that can be permuted, and in exactly one block
    for w in plan.prunable:
        c = plan.closure_of(w)
        assert c is not None and c.problem is None, (w, c and c.problem)
        assert sum(w in b.weights for b in bp.blocks) == 1
    heads = [w for w in plan.weights.values() if not w.prunable]
    assert all(w.head for w in heads), [(w.name, w.reason) for w in heads]
    assert len(plan.prunable) >= 4 * LAYERS
    blocked = sum(1 for c in plan.closures if not c.foldable)
    assert blocked == BLOCKED.get(name, 0), [c.describe() for c in plan.closures if not c.foldable]
    parts = [mb for c in plan.closures for mb in c.members if mb.part is not None]
    assert sum(mb.role == "cols" for mb in parts) == FUSED_PARTS.get(name, 0), parts
    # under policy local only the residual stream (the closure read by many sibling groups) is cut by Gathers
    from permsparse.passes.fold import plan_units

    cut = {u.closure for u in plan_units(plan, "local").units if u.group is not None}
    assert len(cut) == 1 and len(plan.closures[cut.pop()].groups) > 1
    # side tensors (masks, RoPE tables, shapes) are computed without running any weight of the model
    index = ModelIndex(model)
    nodes, missing = index.walk(index.graph_inputs, [bp.first, *bp.side])
    assert not missing
    weight_nodes = {n.name for n in graph.nodes if n.name in plan.weights}
    assert not [n.name for n in nodes if n.name in weight_nodes]


@pytest.mark.parametrize("name,exporter", _params(FAST_FOLD))
def test_family_fold_policy_exact_and_valid(family_model, tmp_path, name, exporter):
    from permsparse.pattern import check_nm
    from permsparse.pipeline import optimize
    from permsparse.pipeline.config import OptimizeConfig

    path = family_model(name, exporter)
    cfg = OptimizeConfig(policy="fold", method="lsa", importance="magnitude", reconstruct="none", progress=False,
                         workers=1)
    out = tmp_path / "sparse.onnx"
    r = optimize(path, out, cfg)
    assert r.fold.gathers == []
    free = sum(1 for c in r.plan.closures if c.foldable and any(r.plan.weights[w].prunable for w in c.siblings))
    assert r.fold.units_applied == free > 0
    assert r.equivalence.max_rel_error <= 1e-4
    assert r.nm_valid and all(r.nm_valid.values()) and len(r.nm_valid) == len(r.plan.prunable)
    # a fused projection's columns are permuted part by part: each part's columns stay among them, and columns of
    # no member part (Q and K of a fused qkv) keep their place
    parts: dict[tuple[str, int], list[np.ndarray]] = {}
    for c in r.plan.closures:
        for mb in c.members:
            if mb.part is not None:
                parts.setdefault((mb.const, mb.axis), []).append(mb.part.ravel())
    permuted = [key for key in parts if key in r.fold.indices]
    assert len(permuted) >= (LAYERS if name in FUSED_PARTS else 0), (len(parts), len(permuted))
    for key in permuted:
        idx = r.fold.indices[key]
        outside = np.ones(len(idx), bool)
        for pos in parts[key]:
            assert sorted(idx[pos].tolist()) == sorted(pos.tolist()), key
            outside[pos] = False
        np.testing.assert_array_equal(idx[outside], np.flatnonzero(outside))
    inits = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    for w in r.plan.prunable:
        info = r.plan.weights[w]
        arr = onnx.numpy_helper.to_array(inits[info.const])
        assert check_nm(arr, info.k_axis, 2, 4), w


@pytest.mark.parametrize("name,exporter", _params(FAST_DEFAULTS))
def test_family_blockwise_defaults_end_to_end(family_model, tmp_path, name, exporter):
    from permsparse.pipeline import optimize
    from permsparse.pipeline.config import OptimizeConfig

    path = family_model(name, exporter)
    cfg = OptimizeConfig(progress=False, workers=1, calib_samples=4, calib_seq_len=16, finetune_epochs=1)
    r = optimize(path, tmp_path / "sparse.onnx", cfg)
    assert len(r.block_reports) == 2 * LAYERS  # block-wise: every block reconstructed in turn
    assert r.equivalence.max_rel_error <= 1e-4
    assert all(r.nm_valid.values()) and len(r.nm_valid) == len(r.plan.prunable)


@pytest.mark.parametrize("name,exporter", _params(("gemma2", "phi3", "gpt2", "clip-vision")))
def test_family_ops_one_by_one_match_onnxruntime(family_model, name, exporter):
    """Every op type of the export runs in the torch evaluator and matches onnxruntime on its real inputs (the first
    node of each type, fed the tensors onnxruntime computed for it)."""
    from permsparse.ir.inputs import concrete_shapes, random_feeds
    from permsparse.passes.probe import probe_session
    from permsparse.torchgraph import GraphProgram, unsupported_ops
    from permsparse.torchgraph.subgraph import ModelIndex

    path = family_model(name, exporter)
    model = onnx.load(str(path))
    assert unsupported_ops(model) == set()
    feeds = random_feeds(model, concrete_shapes(model, None))
    session = probe_session(model, base_dir=path.parent)
    try:
        values = {**session.run(feeds), **feeds}
    finally:
        session.close()
    index = ModelIndex(model)
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type in seen or node.op_type == "Constant":
            continue
        seen.add(node.op_type)
        ins = [i for i in dict.fromkeys(node.input) if i and not index.is_constant(i)]
        outs = [o for o in node.output if o and o in values]
        prog = GraphProgram.from_model(model, inputs=ins, outputs=outs)
        got = prog.run({i: values[i] for i in ins})
        for o in outs:
            ref = np.asarray(values[o])
            out = got[o].detach().cpu().numpy()
            assert out.shape == ref.shape, (node.op_type, o)
            if np.issubdtype(ref.dtype, np.floating):
                np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max(initial=0))),
                                           err_msg=f"{node.op_type} {node.name}")
            else:
                np.testing.assert_array_equal(out, ref, err_msg=f"{node.op_type} {node.name}")
    assert len(seen) >= 10


def test_defaults_fall_back_when_a_block_holds_an_op_torch_lacks(family_model, tmp_path, caplog):
    """A block with an op the torch evaluator lacks (here an identity ``Shrink`` after the first MLP activation):
    the defaults do not stop; they warn, naming the op, and take the per-weight path (onnxruntime calibration)."""
    import logging

    from onnx import helper

    from permsparse.pipeline import optimize
    from permsparse.pipeline.config import OptimizeConfig
    from permsparse.torchgraph import unsupported_ops

    src = family_model("llama", "legacy")
    model = onnx.load(str(src))
    nodes = list(model.graph.node)
    i, act = next((i, n) for i, n in enumerate(nodes) if n.op_type == "Sigmoid")  # SiLU = x * sigmoid(x)
    old = act.output[0]
    act.output[0] = old + "_pre_shrink"
    nodes.insert(i + 1, helper.make_node("Shrink", [act.output[0]], [old], name="shrink_identity", lambd=0.0,
                                         bias=0.0))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = tmp_path / "llama_shrink.onnx"
    onnx.save(model, str(path))
    assert unsupported_ops(path) == {"Shrink"}
    with caplog.at_level(logging.WARNING):
        r = optimize(path, tmp_path / "sparse.onnx", OptimizeConfig(progress=False, workers=1, calib_samples=4,
                                                                    calib_seq_len=16))
    assert any("Shrink" in rec.getMessage() for rec in caplog.records)
    assert r.block_reports == []  # the per-weight path
    assert r.equivalence.max_rel_error <= 1e-4
    assert all(r.nm_valid.values()) and len(r.nm_valid) == len(r.plan.prunable)


def test_inspect_explains_blocks_and_warns_when_the_stream_is_kept_live(family_model, tmp_path):
    """``inspect`` reports blocks, layers, closures and what optimize would do; a model whose embeddings are read
    again at the end (so no cut exists after them) gets a warning naming that tensor."""
    from onnx import helper, numpy_helper

    from permsparse.inspection import inspect_model

    src = family_model("gemma3", "legacy")
    st = inspect_model(src).structure
    assert st["blocks"]["count"] == 2 * LAYERS and st["blocks"]["layers"] == LAYERS == st["repeated_layers"]
    assert st["warnings"] == [] and st["torch_unsupported_ops"] == []
    assert st["optimize"]["path"].startswith("block-wise") and st["optimize"]["identity_under_fold"] == 0

    model = onnx.load(str(src))
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and "embed" in n.input[0])
    emb = gather.output[0]
    last_norm = [n for n in model.graph.node if n.op_type == "Pow"][-1]  # the final RMSNorm's x^2
    x = last_norm.input[0]
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero_scale"))
    extra = [helper.make_node("Mul", [emb, "zero_scale"], ["emb_zero"], name="emb_zero"),
             helper.make_node("Add", [x, "emb_zero"], ["x_plus"], name="late_read")]
    for n in model.graph.node:
        for i, t in enumerate(n.input):
            if t == x and n.name != "late_read":
                n.input[i] = "x_plus"
    idx = list(model.graph.node).index(last_norm)
    for k, n in enumerate(extra):
        model.graph.node.insert(idx + k, n)
    path = tmp_path / "late.onnx"
    onnx.save(model, str(path))
    res = inspect_model(path)
    warn = res.structure["warnings"]
    assert warn and "emb_zero" in warn[0] and "late_read" in warn[0], warn  # the tensor computed from the embeddings
    assert "warning:" in res.explanation() and "not cut at" in res.explanation()


def test_gemma3_eighteen_layers_one_layer_per_block_pair(tmp_path):
    """The reported case: a Gemma-3-style legacy export of 18 layers gave 2 blocks (the mask and RoPE tables are
    built from the shape of the *scaled* embeddings, which kept them live to the end). Now: 36 blocks in 18 layers,
    the stream starting at the scaled embeddings, no weight outside a block."""
    from permsparse.models.families import build_family

    path = build_family("gemma3", "legacy", tmp_path / "gemma3-18.onnx", layers=18)
    _, graph, _, bp = _analyzed(path)
    assert len(bp.blocks) == 36 and len(bp.layers()) == 18 and bp.outside == []
    first_node = next(n for n in graph.nodes if any(o.name == bp.first for o in n.outputs))
    assert first_node.op == "Mul"  # embeddings * sqrt(hidden)


def test_export_verb_offers_every_family(tmp_path):
    """``permsparse export tiny-<family>`` is the registry entry of each family (models/zoo/families.py)."""
    from permsparse.cli import MODEL_NAMES, main
    from permsparse.models.families import FAMILIES

    assert {f"tiny-{name}" for name in FAMILIES} <= set(MODEL_NAMES)
    out = tmp_path / "qwen3.onnx"
    assert main(["export", "tiny-qwen3", "-o", str(out), "--exporter", "legacy", "-q"]) == 0
    import onnx

    model = onnx.load(str(out))
    assert sum(n.op_type == "MatMul" for n in model.graph.node) >= 14  # 2 layers x 7 projections (+ lm_head)


def test_inspect_names_the_columns_of_each_fused_part(family_model):
    """``inspect --json`` lists which columns of the fused weight each part holds (Phi-3: V is the last 32 of the
    128 qkv columns, gate and up the two halves of gate_up)."""
    import permsparse

    info = permsparse.inspect(family_model("phi3", "legacy"))
    runs = [m["part"] for c in info.closures for m in c["members"] if "part" in m]
    assert len(runs) == 3 * LAYERS and all(len(r) == 1 for r in runs)  # one contiguous column range each
    widths = sorted(r[0][1] - r[0][0] for r in runs)
    assert widths == [32] * LAYERS + [128] * (2 * LAYERS)
