"""Input shapes: the ``name:min,opt,max`` syntax and optimization profiles derived from an ONNX model's dynamic axes.

``input_ids:1x8,4x128,8x512`` gives min, opt and max; ``input_ids:4x128`` fixes one shape (min = opt = max).
Dynamic axes the user did not give are filled from other inputs sharing the same ``dim_param`` (``batch``,
``sequence``...), then from defaults by axis name (batch-like axes, sequence-like axes); anything else must be given.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from permsparse.errors import PermsparseError
from permsparse.onnxio import graph_inputs
from permsparse.runtime._io import load_graph

logger = logging.getLogger(__name__)

Dim = int | str | None  # static size, named dynamic axis, or anonymous dynamic axis


@dataclass(frozen=True)
class ShapeSpec:
    """One input's optimization-profile shapes."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise PermsparseError(f"--shapes {self.name}: min, opt and max must have the same rank")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if lo < 0 or not lo <= mid <= hi:
                raise PermsparseError(
                    f"--shapes {self.name}: need 0 <= min <= opt <= max on every axis, got "
                    f"{_fmt(self.min)},{_fmt(self.opt)},{_fmt(self.max)}"
                )

    def __str__(self) -> str:
        return f"{self.name}:{_fmt(self.min)},{_fmt(self.opt)},{_fmt(self.max)}"


@dataclass(frozen=True)
class InputInfo:
    """A graph input: name, dims (int, dim_param name, or None) and numpy dtype."""

    name: str
    dims: tuple[Dim, ...]
    dtype: np.dtype

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.dims)


# Defaults (min, opt, max) for dynamic axes by name; matched case-insensitively against the dim_param.
BATCH_DEFAULT: tuple[int, int, int] = (1, 1, 32)
SEQUENCE_DEFAULT: tuple[int, int, int] = (1, 128, 512)
_BATCH_RE = re.compile(r"batch|^n$|^b$|^bs$", re.IGNORECASE)
_SEQ_RE = re.compile(r"seq|sequence|length|len|token|position|past|total|^s$|^t$", re.IGNORECASE)


def _fmt(dims: Sequence[int]) -> str:
    return "x".join(str(d) for d in dims)


def _parse_dims(text: str, where: str) -> tuple[int, ...]:
    parts = text.strip().lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise PermsparseError(
            f"--shapes {where}: '{text}' is not a shape; write dimensions separated by 'x', e.g. 4x128"
        ) from None
    if not dims or any(d < 0 for d in dims):
        raise PermsparseError(f"--shapes {where}: '{text}' must be non-negative integers separated by 'x'")
    return dims


def parse_shape_arg(arg: str) -> ShapeSpec:
    """Parse ``name:min,opt,max`` or ``name:shape``; the name may itself contain ':' (the last ':' splits)."""
    if ":" not in arg:
        raise PermsparseError(
            f"--shapes '{arg}': expected NAME:MIN,OPT,MAX (e.g. input_ids:1x8,4x128,8x512) or NAME:SHAPE"
        )
    name, _, spec = arg.rpartition(":")
    name = name.strip()
    if not name:
        raise PermsparseError(f"--shapes '{arg}': the input name before ':' is empty")
    pieces = [p for p in spec.split(",")]
    if len(pieces) == 1:
        d = _parse_dims(pieces[0], name)
        return ShapeSpec(name, d, d, d)
    if len(pieces) == 3:
        lo, mid, hi = (_parse_dims(p, name) for p in pieces)
        return ShapeSpec(name, lo, mid, hi)
    raise PermsparseError(f"--shapes '{arg}': give one shape or three (min,opt,max) separated by commas")


def parse_shapes(args: Iterable[str] | None) -> dict[str, ShapeSpec]:
    """Parse several ``--shapes`` arguments (each may also hold several specs separated by spaces or ';')."""
    out: dict[str, ShapeSpec] = {}
    for arg in args or ():
        for piece in re.split(r"[;\s]+", arg.strip()):
            if not piece:
                continue
            spec = parse_shape_arg(piece)
            if spec.name in out:
                raise PermsparseError(f"--shapes: input '{spec.name}' given twice")
            out[spec.name] = spec
    return out


def model_inputs(model: onnx.ModelProto | str | os.PathLike[str]) -> list[InputInfo]:
    """The graph inputs that are not initializers, with their dims."""
    if not isinstance(model, onnx.ModelProto):
        model = load_graph(model)
    return [InputInfo(spec.name, spec.shape, spec.dtype) for spec in graph_inputs(model)]


def _default_for(axis: int, dim: Dim) -> tuple[int, int, int] | None:
    if isinstance(dim, str):
        if _BATCH_RE.search(dim):
            return BATCH_DEFAULT
        if _SEQ_RE.search(dim):
            return SEQUENCE_DEFAULT
        return None
    return BATCH_DEFAULT if axis == 0 else None


def derive_profiles(
    inputs: Sequence[InputInfo],
    user: Mapping[str, ShapeSpec] | None = None,
    defaults: Mapping[str, tuple[int, int, int]] | None = None,
) -> dict[str, ShapeSpec]:
    """One :class:`ShapeSpec` per input (static inputs get their fixed shape).

    Order of precedence for each dynamic axis: the user's shape for that input; the same ``dim_param`` in another
    input the user gave; ``defaults[dim_param]``; the built-in batch/sequence defaults. Raises
    :class:`PermsparseError` naming the input and axis when none applies, or when a user shape contradicts a static dim.
    """
    user = dict(user or {})
    defaults = dict(defaults or {})
    names = {i.name for i in inputs}
    unknown = sorted(set(user) - names)
    if unknown:
        raise PermsparseError(
            f"--shapes names unknown input(s) {', '.join(unknown)}; the model's inputs are: {', '.join(sorted(names))}"
        )
    by_param: dict[str, tuple[int, int, int]] = {}
    for inp in inputs:
        spec = user.get(inp.name)
        if spec is None:
            continue
        if len(spec.min) != len(inp.dims):
            raise PermsparseError(
                f"--shapes {inp.name}: rank {len(spec.min)} but the model's input has rank {len(inp.dims)} "
                f"({_describe(inp)})"
            )
        for axis, d in enumerate(inp.dims):
            triple = (spec.min[axis], spec.opt[axis], spec.max[axis])
            if isinstance(d, int) and triple != (d, d, d):
                raise PermsparseError(
                    f"--shapes {inp.name}: axis {axis} is fixed to {d} in the model, got {triple[0]},{triple[1]},"
                    f"{triple[2]}"
                )
            if isinstance(d, str):
                prev = by_param.setdefault(d, triple)
                if prev != triple:
                    raise PermsparseError(
                        f"--shapes: axis '{d}' is shared by several inputs but given as {prev} and {triple}"
                    )
    out: dict[str, ShapeSpec] = {}
    for inp in inputs:
        if inp.name in user:
            out[inp.name] = user[inp.name]
            continue
        lo, mid, hi = [], [], []
        for axis, d in enumerate(inp.dims):
            if isinstance(d, int):
                triple: tuple[int, int, int] | None = (d, d, d)
            elif isinstance(d, str) and d in by_param:
                triple = by_param[d]
            elif isinstance(d, str) and d in defaults:
                triple = defaults[d]
            else:
                triple = _default_for(axis, d)
            if triple is None:
                raise PermsparseError(
                    f"input '{inp.name}' {_describe(inp)} has dynamic axis {axis} ('{d or '?'}') with no default; "
                    f"give its shapes, e.g. --shapes {inp.name}:MINxMIN,OPTxOPT,MAXxMAX"
                )
            if isinstance(d, str):
                by_param.setdefault(d, triple)
            lo.append(triple[0])
            mid.append(triple[1])
            hi.append(triple[2])
        out[inp.name] = ShapeSpec(inp.name, tuple(lo), tuple(mid), tuple(hi))
    return out


def _describe(inp: InputInfo) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in inp.dims) + "]"


def format_profiles(profiles: Mapping[str, ShapeSpec]) -> str:
    return " ".join(str(s) for s in profiles.values())
