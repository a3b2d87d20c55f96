"""The student (sparse ONNX) and the teacher (dense ONNX) as piece-wise torch programs, and what recovery may train.

The block partition (:mod:`permsparse.passes.blocks`) is found on the teacher; both models are cut at the same
residual-stream tensors (the fold leaves them unpermuted under the ``local``/``fold`` policies), so block ``l`` of the
student is compared with block ``l`` of the teacher. Trainable tensors are *initializer values only*:

- the weights of pruned MatMul/Gemm nodes (every prunable weight of the analysis that is N:M in the student), with
  their keep mask ``W != 0`` frozen; only their kept entries are stored and trained (a 1-D vector per weight, half the
  size of the weight under 2:4), the dense weight is rebuilt from them inside each piece's run
  (:class:`~permsparse.recover.train.StudentWeights`), so a pruned entry has no value, gradient or optimizer state;
- biases and norm parameters: 1-D float initializers whose length is a channel count of a pruned weight, read by
  ``Add``/``Mul``/``Sub``/``Div`` or as scale/bias of ``LayerNormalization``/``SimplifiedLayerNormalization``/
  ``RMSNormalization``/``Gemm`` (the RoPE frequency table and scalars are not channel counts, so they stay frozen).

Invariant: the student programs compute the student ONNX graph exactly (pieces compose to the whole model, the
partition's invariant; each piece is a :class:`~permsparse.torchgraph.GraphProgram`); every trainable tensor is an
initializer of the student, read through the program's constants, so writing its values back into those
initializers gives an ONNX model computing what the programs computed — with the same nodes. A masked weight's
constant in the student programs is a placeholder of its shape filled with NaN: it is always overridden by the
rebuilt dense weight, and a run that forgot the override would give NaN, never a silently wrong number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from permsparse.errors import PermsparseError

log = logging.getLogger(__name__)

_PARAM_OPS = {"Add", "Mul", "Sub", "Div", "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
              "Gemm"}


@dataclass
class Piece:
    label: str
    inputs: list[str]
    outputs: list[str]
    program: object  # GraphProgram
    params: list[str] = field(default_factory=list)  # trainable constants this piece reads


@dataclass
class Pieces:
    """One model cut into prefix, blocks and (optional) suffix."""

    prefix: Piece
    blocks: list[Piece]
    suffix: Piece | None
    graph_inputs: list[str]
    graph_outputs: list[str]
    holder: dict = field(default_factory=dict)

    @property
    def all(self) -> list[Piece]:
        return [self.prefix, *self.blocks, *([self.suffix] if self.suffix is not None else [])]

    def release(self) -> None:
        """Forget the ONNX model once every piece has run (its constants are cached as torch tensors): the model's
        weight bytes are then not held twice."""
        self.holder["index"] = None

    def cache_and_release(self) -> None:
        """Convert every constant of every piece now, then forget the ONNX model (:meth:`release`): the caller can
        drop its proto at once, so the proto's bytes and the converted constants are never held together with the
        other model's."""
        for piece in self.all:
            for name in piece.program.weight_names:
                piece.program.constant(name)
        self.release()


@dataclass
class Trainable:
    """What recovery trains: masked weights (``[stored shape]``, keep mask) and free 1-D parameters."""

    masked: dict[str, tuple[np.ndarray, np.ndarray, int]]  # const -> (fp32 kept values, 1-D; keep mask; K axis)
    free: dict[str, np.ndarray]  # const -> fp32 values (biases, norms)
    dtypes: dict[str, np.dtype]  # const -> dtype stored in the student


def load_proto(path: Path) -> onnx.ModelProto:
    """The model's graph without its external data (weights read lazily, from the model's folder)."""
    if not Path(path).is_file():
        raise PermsparseError(f"{path}: no such ONNX file; give an existing .onnx model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is one line
        raise PermsparseError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if proto.functions:
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
    return proto


def analyze_teacher(teacher: Path):
    """``(plan, block plan or None)`` of the dense teacher (the optimize pipeline's own load → probe → analyze → partition)."""
    from permsparse.passes.blocks import partition
    from permsparse.pipeline import read
    from permsparse.pipeline.config import OptimizeConfig

    cfg = OptimizeConfig().resolved()
    source = read.load(Path(teacher), None)
    analysis = read.analyze(source, read.probe_shapes(source, cfg.check, cfg.seed), cfg.mask,
                            cfg.permutation.policy)
    bp = partition(analysis.graph, analysis.plan)
    if bp is None:
        log.warning("%s: no Transformer blocks found (no residual-stream tensor cuts the graph): recovery runs the "
                    "whole model without activation checkpointing and without the per-block term", teacher)
    return analysis.plan, bp


def find_trainable(student: onnx.ModelProto, base: Path, plan, n: int, m: int, params: str) -> Trainable:
    """The pruned weights of ``plan`` that are N:M in ``student`` (masked) and the biases/norms (see module doc)."""
    from permsparse.ir.model import weight_values
    from permsparse.pattern import check_nm

    inits = {t.name: t for t in student.graph.initializer}
    masked: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    dtypes: dict[str, np.dtype] = {}
    dims: set[int] = set()
    dense_prunable = []
    for name in plan.prunable:
        w = plan.weights[name]
        t = inits.get(w.const)
        if t is None or len(t.dims) != 2:
            continue
        values = np.asarray(weight_values(t, base))
        if not check_nm(values, w.k_axis, n, m) or (values == 0).mean() < (m - n) / m - 1e-9:
            dense_prunable.append(name)
            continue
        dims.update(int(d) for d in t.dims)
        dtypes[w.const] = values.dtype
        if params == "all" and w.const not in masked:
            keep = np.asarray(values != 0)
            masked[w.const] = (np.ascontiguousarray(values[keep], dtype=np.float32), keep, w.k_axis)
        del values
    if not dims:
        raise PermsparseError(
            f"the student has no {n}:{m} sparse weight (of {len(plan.prunable)} prunable ones, none is {n}:{m}); "
            "give the model written by permsparse optimize, not the dense one"
        )
    if dense_prunable:
        log.info("%d prunable weights are not %d:%d in the student; they stay frozen", len(dense_prunable), n, m)
    free: dict[str, np.ndarray] = {}
    for node in student.graph.node:
        if node.op_type not in _PARAM_OPS:
            continue
        for x in node.input:
            t = inits.get(x)
            if t is None or x in free or x in masked or len(t.dims) != 1 or int(t.dims[0]) not in dims:
                continue
            if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
                continue
            values = np.asarray(weight_values(t, base))
            dtypes[x] = values.dtype
            free[x] = values.astype(np.float32)
    return Trainable(masked, free, dtypes)


def build_pieces(model: onnx.ModelProto, base: Path, bp, *, upcast: bool, device: torch.device,
                 tensors: dict[str, torch.Tensor] | None = None,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> Pieces:
    """Prefix, blocks and suffix of ``model`` as programs. ``tensors`` (trainable fp32 tensors by constant name)
    are served as those constants' values (sharing memory on the CPU), so nothing is held twice; a name in
    ``shapes`` (a masked weight stored as its kept entries) is served as a NaN placeholder of that shape that takes
    no memory (the runs override it, see the module docstring)."""
    from permsparse.pipeline.blockwise.state import graph_inputs
    from permsparse.torchgraph import GraphProgram, ProgramConfig
    from permsparse.torchgraph.subgraph import ModelIndex

    index = ModelIndex(model, base)
    tensors = tensors or {}
    shapes = shapes or {}
    holder = {"index": index}  # dropped by Pieces.release once every constant is cached

    def provider(name: str):
        shape = shapes.get(name)
        if shape is not None:
            return torch.full((), float("nan"), device=device).expand(tuple(shape))
        t = tensors.get(name)
        if t is not None:
            return t.detach()
        if holder["index"] is None:
            raise PermsparseError(f"recover: constant {name!r} was read after the model was released (a bug)")
        return holder["index"].constant(name)

    ins, outs = graph_inputs(model), [o.name for o in model.graph.output]
    cfg = ProgramConfig(upcast=upcast, device=str(device))
    made: list[Piece] = []
    for label, pins, pouts in (bp.pieces(ins, outs) if bp is not None else [("whole model", ins, outs)]):
        unknown = [t for t in [*pins, *pouts] if not index.known(t)]
        if unknown:
            raise PermsparseError(
                f"the teacher and the student are not the same model: the student has no tensor {unknown[0]!r} "
                f"({label} of the teacher's blocks); give the dense model the student was made from"
            )
        nodes, missing = index.walk(pins, pouts)
        if missing:
            raise PermsparseError(
                f"the student's {label} reads {missing[:3]} from outside the teacher's block boundaries; the "
                "teacher and the student are not the same model (or the fold permuted the residual stream: "
                "recovery needs --policy local or fold)"
            )
        prog = GraphProgram(nodes, provider, opset=index.opset, inputs=pins, outputs=pouts, config=cfg)
        used = set(prog.weight_names)
        made.append(Piece(label, pins, pouts, prog, [k for k in [*tensors, *shapes] if k in used]))
    suffix = made[-1] if made[-1].label == "suffix" else None
    blocks = [p for p in made if p.label.startswith("block")]
    return Pieces(made[0], blocks, suffix, ins, outs, holder)


def initializer_dtype(t: onnx.TensorProto) -> np.dtype:
    return numpy_helper.tensor_dtype_to_np_dtype(t.data_type)


__all__ = ["Pieces", "Trainable", "analyze_teacher", "build_pieces", "find_trainable", "load_proto"]
