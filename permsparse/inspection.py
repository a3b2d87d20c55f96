"""``inspect``: what permsparse sees in a model — weights, closures, fold status and N:M validity of every weight.

Read-only: the model is loaded with its weights left on disk (read memory-mapped one at a time), probed once for
shapes, and analyzed exactly as ``optimize`` analyzes it, so both report the same closures for the same model.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from permsparse.errors import PermsparseError
from permsparse.ir.shapes import ShapeSpec
from permsparse.pattern import NMPattern


@dataclass(frozen=True)
class InspectConfig:
    """Settings of ``permsparse inspect``; ``None`` means the default (2:4, shapes guessed)."""

    pattern: NMPattern | str | None = None
    shapes: dict[str, ShapeSpec] | None = None


@dataclass
class InspectResult:
    model: Path
    pattern: NMPattern
    weights: list[dict[str, Any]]
    closures: list[dict[str, Any]]
    structure: dict[str, Any] = field(default_factory=dict)  # blocks, what optimize would do, warnings

    def explanation(self) -> str:
        """The model's structure in words: blocks (and why spans were not cut), closures' boundaries, what
        ``optimize`` would do, warnings."""
        return explain_text(self.structure)

    @property
    def n_valid(self) -> int:
        return sum(1 for w in self.weights if w["nm_valid"])

    def to_dict(self) -> dict[str, Any]:
        return {"model": str(self.model), "pattern": str(self.pattern), "weights": self.weights,
                "closures": self.closures, "structure": self.structure,
                "summary": {"weights": len(self.weights), "nm_valid": self.n_valid, "closures": len(self.closures),
                            "fold_for_free": sum(1 for c in self.closures if c["foldable"])}}


def inspect_model(path: str | os.PathLike[str], config: InspectConfig | None = None) -> InspectResult:
    from permsparse.ir.graph import const_index, import_graph
    from permsparse.ir.inputs import concrete_shapes, random_feeds
    from permsparse.ir.model import load_model
    from permsparse.ir.weights import node_scopes
    from permsparse.passes.analysis import analyze
    from permsparse.passes.names import name_nodes
    from permsparse.passes.probe import probe
    from permsparse.pattern import check_nm, nm_keep_mask

    cfg = config or InspectConfig()
    pattern = NMPattern.parse(cfg.pattern) if cfg.pattern is not None else NMPattern()
    src = Path(path)
    model = load_model(src)
    shapes = concrete_shapes(model, cfg.shapes)
    pr = probe(model, random_feeds(model, shapes), base_dir=src.parent)
    graph = import_graph(model, src.parent)
    name_nodes(graph)
    plan = analyze(graph, pr, pattern=pattern, prune_head=True, scopes=node_scopes(model))
    consts = const_index(graph)
    weights = []
    for name, w in plan.weights.items():
        values = np.asarray(consts[w.const].values)
        c = plan.closure_of(name)
        wk = np.abs(np.asarray(w.k_major(values), dtype=np.float64))
        fits = w.k % pattern.m == 0
        kept = float(wk[nm_keep_mask(wk, pattern.n, pattern.m)].sum() / max(wk.sum(), 1e-30)) if fits else None
        weights.append({
            "weight": name, "layer": w.label, "constant": w.const, "shape": list(w.stored_shape),
            "dtype": w.dtype, "k_axis": w.k_axis, "k": w.k, "n": w.n,
            "closure": None if c is None else c.id,
            "fold": "n/a" if c is None else c.describe(),
            "prunable": w.prunable or w.head, "reason": w.reason,
            "nm_valid": bool(fits and check_nm(values, w.k_axis, pattern.n, pattern.m)),
            "density": float(np.count_nonzero(values) / max(values.size, 1)),
            "kept_abs_by_nm": kept,
        })
    closures = [
        {
            "id": c.id, "block": c.block, "k": c.k, "siblings": c.siblings, "groups": dict(c.groups),
            "foldable": c.foldable, "status": c.describe(), "boundaries": [b.reason for b in c.boundaries],
            "members": [{"constant": mb.const, "axis": mb.axis, "role": mb.role,
                         **({"part": _ranges(mb.part)} if mb.part is not None else {})} for mb in c.members],
        }
        for c in plan.closures
    ]
    if not weights:
        raise PermsparseError(f"{src}: no MatMul/Gemm reads a constant 2-D weight; nothing to inspect")
    # what optimize analyzes: the same closures, heads kept dense
    from permsparse.passes.analysis import Plan

    body = Plan({k: replace(w, prunable=False, reason=w.reason or "head") if w.head else w
                 for k, w in plan.weights.items()}, plan.closures, plan.weight_closure, plan.pattern)
    return InspectResult(src, pattern, weights, closures, explain_structure(graph, body))


def _repeated_layers(graph: Any) -> int:
    """Repeated attention layers, counted from the structure alone: MatMuls of two activations come in pairs per
    attention (``Q @ Kᵀ`` and ``probs @ V``)."""
    from permsparse.passes.blocks import _is_attention

    return sum(1 for n in graph.nodes if _is_attention(n)) // 2


def explain_structure(graph: Any, plan: Any) -> dict[str, Any]:
    """Blocks, closures and what ``optimize`` (defaults: policy ``local``, block-wise reconstruction) would do with
    the analyzed ``graph``/``plan`` (``plan`` as ``optimize`` analyzes: heads dense), with warnings when the blocks
    look wrong. Read-only."""
    from permsparse.passes.blocks import partition, sweep
    from permsparse.passes.fold import plan_units
    from permsparse.torchgraph import unsupported_ops

    out: dict[str, Any] = {"warnings": []}
    sw = sweep(graph, plan)
    bp = partition(graph, plan)
    expected = _repeated_layers(graph)
    out["repeated_layers"] = expected
    if bp is None or sw is None:
        out["blocks"] = {"count": 0, "layers": 0, "cuts": 0 if sw is None else len(sw.cuts), "first": None,
                         "side": [], "list": [], "not_cut": []}
    else:
        not_cut = []
        holders: Counter[tuple[str, str, bool]] = Counter()
        for t in sw.candidates:
            if t in sw.cuts:
                continue
            live = sw.live_after(t)
            holders.update(live)
            if len(not_cut) < 20:
                not_cut.append({"tensor": t, "kept_live_by": [{"tensor": x, "reader": r, "shape_only": so}
                                                              for x, r, so in live[:3]]})
        out["blocks"] = {
            "count": len(bp.blocks), "layers": len(bp.layers()), "cuts": len(sw.cuts), "first": bp.first,
            "side": list(bp.side),
            "list": [{"index": b.index, "input": b.input, "output": b.output, "weights": len(b.weights),
                      "attention": b.attention} for b in bp.blocks],
            "outside": list(bp.outside), "not_cut": not_cut,
        }
        if expected and len(bp.layers()) < expected:
            top = holders.most_common(1)
            why = ""
            if top:
                (x, reader, shape_only), n = top[0]
                why = (f"; the stream is kept live by tensor {x!r} (read by {reader!r}"
                       f"{', only for its shape or type' if shape_only else ''}) across {n} candidate cuts")
            out["warnings"].append(
                f"{len(bp.blocks)} blocks in {len(bp.layers())} layers for {expected} repeated attention layers: "
                f"block-wise calibration would run whole groups of layers at once{why}")
    if bp is None and expected:
        out["warnings"].append(f"no blocks found for {expected} repeated attention layers: optimize falls back to "
                               "per-weight masking without reconstruction")
    missing = sorted(unsupported_ops(graph))
    out["torch_unsupported_ops"] = missing
    units = plan_units(plan, "local")
    fold_units = plan_units(plan, "fold")
    blockwise = bp is not None and not missing
    out["optimize"] = {
        "path": ("block-wise (calibration, permutations, SparseGPT block by block)" if blockwise else
                 "per-weight (onnxruntime calibration, no reconstruction)"),
        "prunable": len(plan.prunable), "dense": len(plan.weights) - len(plan.prunable),
        "units_local": len(units.units), "gathers_local": units.gathers_planned,
        "units_fold": len(fold_units.units), "identity_under_fold": len(fold_units.identity),
    }
    if missing:
        out["warnings"].append(f"the torch evaluator lacks op(s) {', '.join(missing)}: the defaults take the "
                               "per-weight path")
    out["closures"] = [{"id": c.id, "weights": len(c.siblings), "status": c.describe(),
                        "boundaries": sorted({b.reason for b in c.boundaries})[:5]} for c in plan.closures]
    return out


def explain_text(st: dict[str, Any]) -> str:
    """:func:`explain_structure`'s result as lines of text."""
    if not st:
        return ""
    b, o = st["blocks"], st["optimize"]
    head = (f"blocks: {b['count']} in {b['layers']} layers ({b['cuts']} cuts of the residual stream; "
            f"{st['repeated_layers']} repeated attention layers); side inputs: {len(b['side'])}")
    lines = [head]
    for nc in b["not_cut"][:3] if st["warnings"] else []:
        held = ", ".join(f"{h['tensor']} (read by {h['reader']}{', shape only' if h['shape_only'] else ''})"
                         for h in nc["kept_live_by"])
        lines.append(f"  not cut at {nc['tensor']}: still live: {held}")
    for c in st["closures"]:
        if c["status"] != "folds for free":
            lines.append(f"closure {c['id']} ({c['weights']} weights): {c['status']}")
    lines.append(f"optimize would go {o['path']}: {o['prunable']} weights pruned, {o['dense']} kept dense; policy "
                 f"local: {o['units_local']} permutations, {o['gathers_local']} Gathers; policy fold: "
                 f"{o['units_fold']} permutations, {o['identity_under_fold']} closures keep the identity")
    lines += [f"warning: {w}" for w in st["warnings"]]
    return "\n".join(lines)


__all__ = ["InspectConfig", "InspectResult", "inspect_model", "replace"]


def _ranges(channels) -> list[list[int]]:
    """A fused projection part's channels as ``[start, stop)`` runs (the columns of the fused weight it holds)."""
    import numpy as np

    idx = np.asarray(channels, dtype=np.int64).ravel()
    runs: list[list[int]] = []
    for i in idx.tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs
