"""The fold step of ``optimize`` and its postcondition.

    fold(source, analysis, perms, cfg, work) -> Folded

Rewrite: every unit's permutation is folded into the weights of its closure (and a Gather is placed where the policy
allows one), :func:`permsparse.passes.fold.apply_fold`, in place on ``analysis.graph``.
Postcondition (checked here, before anything is written): the permuted *dense* graph computes the same outputs as the
input, within ``cfg.check.rtol``, on random inputs at two sizes — on onnxruntime for the whole model, or block by
block in PyTorch for a big model (:data:`permsparse.pipeline.read.WHOLE_CHECK_MAX_BYTES`). A failed check raises
:class:`VerificationError`: nothing is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from permsparse.errors import PermsparseError, VerificationError
from permsparse.ir.compare import Equivalence, compare
from permsparse.ir.graph import export_graph
from permsparse.ir.inputs import concrete_shapes, random_feeds
from permsparse.ir.save import save_model, spill_constants
from permsparse.ir.session import run_outputs
from permsparse.ir.upcast import upcast_feeds, upcast_model
from permsparse.passes.fold import FoldResult, apply_fold
from permsparse.pipeline.config import ResolvedConfig
from permsparse.pipeline.read import Analysis, Source, partition_of, verify_feeds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Folded:
    """What the fold did (row orders, Gathers) and the proof that the permuted dense graph equals the input."""

    fold: FoldResult
    equivalence: Equivalence


def fold(source: Source, analysis: Analysis, perms: dict[str, np.ndarray], cfg: ResolvedConfig, work: Path) -> Folded:
    """Fold the permutations into the graph, then check the postcondition (see the module doc)."""
    result = apply_fold(analysis.graph, analysis.plan, analysis.units.units, perms)
    eq = _check(source, analysis, result, cfg, work)
    if not eq.ok:
        raise VerificationError(
            f"the permuted model differs from the input (max relative error {eq.max_rel_error:.3g} on output "
            f"{eq.worst_output!r} > {cfg.check.rtol:g}); nothing was written. This is a bug in permsparse: please "
            "report it with the model, or run with --policy fold to avoid Gathers."
        )
    return Folded(result, eq)


def _check(source: Source, analysis: Analysis, result: FoldResult, cfg: ResolvedConfig, work: Path) -> Equivalence:
    from permsparse.pipeline.blockwise.check import applicable

    whole = source.whole_check(cfg.check)
    bp = None if whole else partition_of(source, analysis.plan)
    blockwise_ok = bp is not None and applicable(cfg.permutation.policy, result.gathers)
    if not whole and not blockwise_ok and cfg.check.mode == "auto":
        log.info("the fold check runs the whole model on onnxruntime (this model cannot be checked block by block); "
                 "it holds ~5x the weights' size in memory")
        whole = True
    if source.external:
        spill_constants(analysis.graph, {c for c, _ in result.indices}, work)
        # weights referenced where they lie, by absolute path
        folded, folded_dir = export_graph(analysis.graph, source.model), work
        if whole:  # onnxruntime wants the data beside the model
            folded = onnx.load(str(save_model(folded, work / "dense.onnx", external_data=True)),
                               load_external_data=False)
    else:
        folded, folded_dir = export_graph(analysis.graph, source.model), None
    if not whole:
        return _check_blockwise(source, bp if blockwise_ok else None, cfg, folded, folded_dir or source.base_dir)
    feeds = verify_feeds(source.model, cfg.check, cfg.seed)
    if source.half:
        reference = run_outputs(upcast_model(source.model, source.base_dir), [upcast_feeds(f) for f in feeds])
        candidate = run_outputs(upcast_model(folded, folded_dir), [upcast_feeds(f) for f in feeds])
    else:
        reference = run_outputs(source.path, feeds)
        candidate = run_outputs(folded, feeds, base_dir=folded_dir)
    method = "whole model on onnxruntime" + (", 16-bit weights compared as fp32" if source.half else "")
    return compare(reference, candidate, cfg.check.rtol, method)


def _check_blockwise(source: Source, bp, cfg: ResolvedConfig, folded: onnx.ModelProto, folded_dir: Path
                     ) -> Equivalence:
    from permsparse.pipeline.blockwise.check import check_blockwise

    if bp is None:
        raise PermsparseError(
            "the fold check cannot run block by block on this model (no residual-stream blocks, or permutations "
            "that cross them: policy global); use --check whole (the whole model on onnxruntime, ~5x the weights' "
            "size in memory), or --policy local (or fold)"
        )
    feeds = [random_feeds(source.model, concrete_shapes(source.model, batch=1, seq=7), seed=cfg.seed + 1)]
    return check_blockwise(source.model, source.base_dir, folded, folded_dir, bp, feeds, cfg.check.rtol)
