"""Calibration norms ‖X_k‖₂ block by block, for models too big to run whole (e.g. a 7B fp16 model on 24 GB).

Read-only. With the block partition of the model (:mod:`permsparse.passes.blocks`), the prefix, each block in turn
and (when a requested tensor lies after the last block) the suffix are run in PyTorch (:mod:`permsparse.torchgraph`,
16-bit weights widened to float32), each on the previous piece's outputs; every requested tensor is observed as it is
produced and its per-channel sum of squares accumulated over real tokens (padding excluded), exactly what
:func:`permsparse.data.calibration.collect_activation_stats` computes on onnxruntime for the whole model.

Invariant: the pieces compose to the whole model (the partition's invariant), so each observed tensor has the value
the whole model gives it. Memory: one piece's weights (read from the external data when needed) plus the stream
activations of the calibration batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import torch

from permsparse.devices import feed_to_device
from permsparse.errors import PermsparseError
from permsparse.passes.blocks import BlockPlan
from permsparse.pipeline.blockwise.state import HessianSet, graph_inputs, half_weights

log = logging.getLogger(__name__)


def block_input_norms(
    model: onnx.ModelProto, base_dir: Path, bp: BlockPlan, names: list[str],
    feeds: Iterable[Mapping[str, np.ndarray]], samples: int, progress: bool | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """``{name: ‖X‖₂ per channel}`` of the tensors ``names`` over ``samples`` calibration examples of ``feeds``,
    the pieces run on torch ``device``."""
    from tqdm.auto import tqdm

    from permsparse.torchgraph import GraphProgram, ProgramConfig

    dev = torch.device(device)
    config = ProgramConfig(upcast=half_weights(model), device=str(dev))
    inputs = graph_inputs(model)
    (_, _, prefix_outs), *pieces = bp.pieces(inputs, [o.name for o in model.graph.output])

    def program(ins: list[str], outs: list[str]):
        return GraphProgram.from_model(model, inputs=ins, outputs=outs, base_dir=base_dir, config=config)

    acc = HessianSet(set(names), diagonal=True)
    batches: list[tuple[dict[str, torch.Tensor], torch.Tensor | None]] = []
    taken = 0
    prefix = program(inputs, prefix_outs)
    for feed in feeds:
        if taken >= samples:
            break
        feed = {k: np.asarray(v) for k, v in feed.items()}
        b = next((v.shape[0] for v in feed.values() if v.ndim >= 1), 1)
        if taken + b > samples:
            feed = {k: v[: samples - taken] if v.ndim >= 1 else v for k, v in feed.items()}
            b = samples - taken
        mask = feed.get("attention_mask")
        acc.mask = torch.as_tensor(mask != 0, device=dev) if mask is not None and mask.ndim == 2 else None
        env = feed_to_device({k: feed[k] for k in inputs}, dev)
        for k, v in env.items():
            acc.observe(k, v)
        with torch.no_grad():
            out = prefix.run(env, hook=acc.observe)
        batches.append(({**env, **{k: out[k] for k in prefix_outs}}, acc.mask))
        taken += b
    if not batches:
        raise PermsparseError("calibration got no data: the feeds were empty; give a non-empty --calib source")
    del prefix
    keep = set(bp.side) | set(inputs)
    bar = tqdm(total=len(pieces), desc="calibration (block by block)", unit="block",
               disable=(None if progress is None else not progress))
    try:
        for label, ins, outs in pieces:
            if set(acc.names) <= set(acc.h) and label == "suffix":
                break
            prog = program(ins, outs)
            with torch.no_grad():
                for env, mask in batches:
                    acc.mask = mask
                    out = prog.run({k: env[k] for k in ins}, hook=acc.observe)
                    for k in ins:  # the stream moves on: keep only what later pieces read
                        if k not in keep:
                            del env[k]
                    env.update({k: out[k] for k in outs})
            del prog
            bar.update(1)
    finally:
        bar.close()
    missing = sorted(set(names) - set(acc.h))
    if missing:
        raise PermsparseError(f"block-wise calibration never produced {missing[:5]}; use --check whole to calibrate "
                              "the whole model on onnxruntime")
    log.info("calibration (block by block): %d examples, %d tensors, %d tokens", taken, len(names),
             next(iter(acc.count.values())))
    return {k: np.sqrt(v) for k, v in acc.numpy().items()}


__all__ = ["block_input_norms"]
