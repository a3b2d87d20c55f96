"""The fold check block by block, for models that do not fit in memory twice (e.g. a 7B fp16 model on 24 GB).

Check (no rewrite). With the block partition of the input (:mod:`permsparse.passes.blocks`), the prefix, every
block and the suffix of the input and of the permuted dense model are run one at a time in PyTorch
(:mod:`permsparse.torchgraph`, float32 — 16-bit weights widened exactly), each permuted piece on the *same* input as
the original piece, and every piece's output is compared with :func:`permsparse.ir.compare.rel_error`. Memory: one
block's weights at a time, read memory-mapped. Valid when the fold leaves the cut tensors unpermuted — policies
``fold`` and ``local`` (whose permutations live inside blocks) — which :func:`applicable` checks.

Invariant: if every piece maps equal inputs to equal outputs, the two models are equal, because the pieces compose
to the whole model (the partition's invariant).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from permsparse.ir.compare import Equivalence, rel_error
from permsparse.passes.blocks import BlockPlan
from permsparse.pipeline.blockwise.state import graph_inputs

log = logging.getLogger(__name__)

METHOD = "block by block on PyTorch (fp32)"


def applicable(policy: str, fold_gathers: Sequence[str]) -> bool:
    """Boundary tensors keep their channel order under ``fold``/``local`` (global Gathers permute the stream)."""
    return policy in ("fold", "local") and not any("boundary_gather" in g for g in fold_gathers)


def check_blockwise(
    original: onnx.ModelProto, original_dir: Path, folded: onnx.ModelProto, folded_dir: Path, bp: BlockPlan,
    feeds: Sequence[Mapping[str, np.ndarray]], rtol: float,
) -> Equivalence:
    from permsparse.torchgraph import GraphProgram, ProgramConfig

    config = ProgramConfig(upcast=True)
    inputs = graph_inputs(original)
    outputs = [o.name for o in original.graph.output]

    def prog(model, base, ins, outs):
        return GraphProgram.from_model(model, inputs=ins, outputs=outs, base_dir=base, config=config)

    worst, worst_name = 0.0, ""
    envs = [{k: torch.as_tensor(np.asarray(v)) for k, v in f.items()} for f in feeds]
    for label, ins, outs in bp.pieces(inputs, outputs):
        po = prog(original, original_dir, ins, outs)
        pf = prog(folded, folded_dir, ins, outs)
        with torch.no_grad():
            for env in envs:
                feed = {k: env[k] for k in ins}
                a = po.run(feed)
                b = pf.run(feed)
                for name in outs:
                    err = rel_error(a[name].float().numpy(), b[name].float().numpy())
                    if err > worst or not worst_name:
                        worst, worst_name = err, f"{name} ({label})"
                env.update({k: v for k, v in a.items()})
        del po, pf
    log.info("block-wise fold check: max rel. error %.3g (%s)", worst, worst_name)
    return Equivalence(worst, worst_name, rtol, len(feeds), METHOD)
