"""``inspect``: what permsparse sees in a model — weights, closures, fold status and N:M validity of every weight.

Read-only: the model is loaded with its weights left on disk (read memory-mapped one at a time), probed once for
shapes, and analyzed exactly as ``optimize`` analyzes it, so both report the same closures for the same model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
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

    @property
    def n_valid(self) -> int:
        return sum(1 for w in self.weights if w["nm_valid"])

    def to_dict(self) -> dict[str, Any]:
        return {"model": str(self.model), "pattern": str(self.pattern), "weights": self.weights,
                "closures": self.closures,
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
            "members": [{"constant": mb.const, "axis": mb.axis, "role": mb.role} for mb in c.members],
        }
        for c in plan.closures
    ]
    if not weights:
        raise PermsparseError(f"{src}: no MatMul/Gemm reads a constant 2-D weight; nothing to inspect")
    return InspectResult(src, pattern, weights, closures)


__all__ = ["InspectConfig", "InspectResult", "inspect_model", "replace"]
