"""The reading steps of ``optimize``: load the input (paths checked first), probe its shapes, analyze the graph and
find what the model-dependent defaults depend on. Nothing here writes anything.

    load(src, dst)                       -> Source
    probe_shapes(source, check, seed)    -> Probe
    analyze(source, probe, mask, policy) -> Analysis
    model_facts(source, analysis, ...)   -> (ModelFacts, BlockPlan | None)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from permsparse.errors import PermsparseError
from permsparse.ir.graph import import_graph
from permsparse.ir.inputs import concrete_shapes, random_feeds
from permsparse.ir.model import (
    check_input,
    file_sha256,
    fp32_bytes,
    load_model,
    model_files,
    uses_external_data,
)
from permsparse.ir.save import check_output
from permsparse.ir.upcast import is_half_model
from permsparse.ir.weights import node_scopes
from permsparse.passes.analysis import Plan
from permsparse.passes.analysis import analyze as analyze_plan
from permsparse.passes.fold import UnitPlan, plan_units
from permsparse.passes.names import name_nodes
from permsparse.passes.probe import Probe, probe, probe_session, static_probe
from permsparse.pipeline.config import CheckConfig, MaskConfig, ModelFacts

log = logging.getLogger(__name__)

#: Above this many bytes of (fp32-widened) weights, ``--check auto`` runs the fold check and the calibration block by
#: block in PyTorch (~1.5x the weights' size) rather than the whole model on onnxruntime, which holds the input, the
#: folded copy and a session's own copies of the weights (~5x: 9.3 GB for a 1.74 GB model, bench/results/
#: family-decoder.md). A fixed size, not the machine's free memory, so the same input gives the same output anywhere.
WHOLE_CHECK_MAX_BYTES = 1_000_000_000


@dataclass(frozen=True)
class Source:
    """The input model as loaded: the graph proto (weights stay on disk for external-data models), its sha256, and
    whether its weights are external and 16-bit. ``inline``: the weights lie inside the .onnx file but are read from
    it on demand like external data (a model over :data:`WHOLE_CHECK_MAX_BYTES`,
    :func:`permsparse.ir.header.load_lazy`); the output is then written as one file too."""

    path: Path
    model: onnx.ModelProto
    digest: str
    external: bool
    half: bool
    inline: bool = False

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def whole_check(self, check: CheckConfig) -> bool:
        """Run the model whole on onnxruntime (fold check, calibration): ``--check whole``, or ``auto`` and the
        weights are at most :data:`WHOLE_CHECK_MAX_BYTES` (callers fall back to whole under ``auto`` when the model
        cannot be run block by block)."""
        return check.mode == "whole" or (check.mode == "auto" and fp32_bytes(self.model) <= WHOLE_CHECK_MAX_BYTES)


@dataclass(frozen=True)
class Analysis:
    """The graph (onnx-graphsurgeon, nodes named), its plan (weights, closures) and the policy's permutation units."""

    graph: gs.Graph
    plan: Plan
    units: UnitPlan


def load(src: Path, dst: Path | None) -> Source:
    """Check the paths before any work (the output may not be one of the input's files), load the graph, refuse bad
    input."""
    model = load_model(src, lazy_inline_above=WHOLE_CHECK_MAX_BYTES)
    files = model_files(src, model)
    if dst is not None:
        check_output(dst, frozenset(files))
    check_input(model, src)
    external = uses_external_data(model)
    return Source(src, model, file_sha256(src), external, is_half_model(model),
                  inline=external and files == {src.resolve()})


def probe_shapes(source: Source, check: CheckConfig, seed: int) -> Probe:
    """Shapes and small integer values: static inference when it resolves everything, else one onnxruntime run."""
    feeds = random_feeds(source.model, concrete_shapes(source.model, check.shapes), seed=seed)
    found = static_probe(source.model, feeds)
    if found is not None:
        return found
    session = probe_session(source.model, base_dir=source.base_dir)
    try:
        return probe(source.model, feeds, session=session)
    finally:
        session.close()


def analyze(source: Source, shapes: Probe, mask: MaskConfig, policy: str) -> Analysis:
    """Name nodes, find weights and closures, and decide the permutation units of the policy."""
    graph = import_graph(source.model, source.base_dir)
    name_nodes(graph)
    plan = analyze_plan(graph, shapes, pattern=mask.pattern, prune_head=mask.prune_head, exclude=mask.exclude,
                        scopes=node_scopes(source.model))
    if not plan.prunable:
        reasons = sorted({w.reason or "" for w in plan.weights.values()})
        hint = "; ".join(reasons) if reasons else "no MatMul/Gemm reads a constant 2-D weight"
        raise PermsparseError(f"{source.path}: no prunable weights ({hint}).")
    return Analysis(graph, plan, plan_units(plan, policy))


def model_facts(source: Source, analysis: Analysis, find_blocks: bool):
    """``(ModelFacts, BlockPlan | None)``: the input kind, and (``find_blocks``) the Transformer blocks and the ops
    the torch evaluator lacks."""
    from permsparse.data.kinds import model_kind

    try:
        kind, why = model_kind(source.model), None
    except PermsparseError as exc:
        kind, why = None, str(exc).split(", so ")[0]
    if not find_blocks:
        return ModelFacts(kind, why), None
    from permsparse.passes.blocks import partition
    from permsparse.torchgraph import unsupported_ops

    blocks = partition(analysis.graph, analysis.plan)
    missing = tuple(sorted(unsupported_ops(analysis.graph))) if blocks is not None else ()
    return ModelFacts(kind, why, blocks is not None, missing), blocks


def partition_of(source: Source, plan: Plan):
    """The Transformer blocks of the *input* graph (a fresh import: the analysis graph may already be folded)."""
    from permsparse.passes.blocks import partition

    graph = import_graph(source.model, source.base_dir)
    name_nodes(graph)
    return partition(graph, plan)


def verify_feeds(model: onnx.ModelProto, check: CheckConfig, seed: int) -> list[dict]:
    """Random inputs for the fold check at two sizes (batch 2, two sequence lengths) unless the user fixed the
    shapes."""
    if check.shapes:
        shapes = concrete_shapes(model, check.shapes)
        return [random_feeds(model, shapes, seed=seed + i) for i in (1, 2)]
    return [random_feeds(model, concrete_shapes(model, batch=2, seq=seq), seed=seed + i + 1)
            for i, seq in enumerate((5, 13))]
