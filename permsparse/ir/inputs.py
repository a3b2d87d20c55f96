"""Graph inputs: one input record, concrete shapes for analysis and checks, one random-feed builder.

Shapes are given in one syntax (:mod:`permsparse.ir.shapes`). Feeds. :func:`random_feeds` fills every input for checks and benchmarks: normal floats, token ids below the
embedding table's size (:func:`vocab_hints`, the one vocabulary finder), all-ones masks, zero type ids, positions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from permsparse.errors import PermsparseError, UsageError
from permsparse.ir.header import load_structure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeSpec:
    """One input's shapes: ``min``/``opt``/``max`` (equal for a fixed shape)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise UsageError(f"--shapes {self.name}: min, opt and max must have the same rank")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if lo < 0 or not lo <= mid <= hi:
                raise UsageError(
                    f"--shapes {self.name}: need 0 <= min <= opt <= max on every axis, got "
                    f"{_fmt(self.min)},{_fmt(self.opt)},{_fmt(self.max)}"
                )

    @classmethod
    def fixed(cls, name: str, dims: Sequence[int]) -> ShapeSpec:
        d = tuple(int(x) for x in dims)
        return cls(name, d, d, d)

    def __str__(self) -> str:
        if self.min == self.opt == self.max:
            return f"{self.name}:{_fmt(self.opt)}"
        return f"{self.name}:{_fmt(self.min)},{_fmt(self.opt)},{_fmt(self.max)}"


def _fmt(dims: Sequence[int]) -> str:
    return "x".join(str(d) for d in dims)

Dim = int | str | None  # static size, named dynamic axis, or anonymous dynamic axis

#: Sizes the analysis probes with when the user gives no shapes (odd and prime: never mistaken for a channel count).
PROBE_BATCH = 1
PROBE_SEQ = 7


@dataclass(frozen=True)
class InputSpec:
    """A graph input that is not an initializer: name, dims (int, dim_param name, or None) and numpy dtype."""

    name: str
    shape: tuple[Dim, ...]
    dtype: np.dtype

    @property
    def dims(self) -> tuple[Dim, ...]:
        return self.shape

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) or d <= 0 for d in self.shape)

    def static(self, axis: int) -> int | None:
        """The static size of ``axis``, or ``None`` when it is dynamic or the rank is smaller."""
        if axis >= len(self.shape) or axis < -len(self.shape):
            return None
        d = self.shape[axis]
        return d if isinstance(d, int) and d > 0 else None


def _describe(inp: InputSpec) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in inp.shape) + "]"


def graph_inputs(model: onnx.ModelProto | str | os.PathLike[str]) -> list[InputSpec]:
    """The graph inputs that are not initializers (a path is read without its weights)."""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise PermsparseError(f"model file {str(path)!r} does not exist")
        model = load_structure(path)
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        dims: list[Dim] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(vi.name, tuple(dims), dtype))
    return specs


def concrete_shapes(
    model: onnx.ModelProto,
    user: Mapping[str, ShapeSpec] | None = None,
    *,
    batch: int = PROBE_BATCH,
    seq: int = PROBE_SEQ,
) -> dict[str, tuple[int, ...]]:
    """One concrete shape per input for analysis and checks: the user's ``opt`` shape, else static dims, ``batch``
    for axis 0 and ``seq`` for token-like axes (an integer input's axis 1, or axis 1 of a ``[B, S, C]`` input)."""
    user = dict(user or {})
    specs = graph_inputs(model)
    unknown = sorted(set(user) - {s.name for s in specs})
    if unknown:
        raise UsageError(f"unknown input(s) {unknown}; the model's inputs are: {', '.join(s.name for s in specs)}")
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in user:
            shape = user[spec.name].opt
            if len(shape) != len(spec.shape) or any(
                isinstance(d, int) and d > 0 and d != s for d, s in zip(spec.shape, shape)
            ):
                raise UsageError(
                    f"input {spec.name!r}: shape {list(shape)} does not match the model's declared shape "
                    f"{_describe(spec)}"
                )
            shapes[spec.name] = tuple(shape)
            continue
        resolved = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                resolved.append(d)
            elif axis == 0:
                resolved.append(batch)
            elif axis == 1 and (np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_ or len(spec.shape) == 3):
                resolved.append(seq)
            else:
                raise UsageError(
                    f"input {spec.name!r} has dynamic dimension {axis} ({d!r}) of shape {_describe(spec)} that "
                    f"cannot be guessed; give a concrete shape, e.g. --shapes {spec.name}:"
                    + "x".join(str(x if isinstance(x, int) and x > 0 else 1) for x in spec.shape)
                )
        shapes[spec.name] = tuple(resolved)
    return shapes


# ------------------------------------------------------------------------------------------------- feeds


def vocab_hints(model: onnx.ModelProto) -> dict[str, int]:
    """For integer graph inputs used (through Cast/Identity/Reshape/...) as Gather indices into a constant table:
    the table's row count. The one vocabulary finder of permsparse."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    inits[node.output[0]] = a.t
    inputs = {s.name for s in graph_inputs(model)}
    alias: dict[str, str] = {n: n for n in inputs}
    hints: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten") and node.input \
                and node.input[0] in alias:
            alias[node.output[0]] = alias[node.input[0]]
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in alias and node.input[0] in inits:
            dims = inits[node.input[0]].dims
            if len(dims) == 2:
                name = alias[node.input[1]]
                hints[name] = min(hints.get(name, int(dims[0])), int(dims[0]))
    return hints


def random_feeds(
    model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs: normal floats; token ids below the embedding table's size; all-ones masks; zero type ids;
    positions ``0..S-1``."""
    rng = np.random.default_rng(seed)
    hints = vocab_hints(model)
    feeds: dict[str, np.ndarray] = {}
    for spec in graph_inputs(model):
        shape = tuple(shapes[spec.name])
        lname = spec.name.lower()
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = np.ones(shape, dtype=np.bool_)
        elif "mask" in lname:
            feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif "type" in lname:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        elif "position" in lname and shape:
            feeds[spec.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype).copy()
        else:
            high = max(1, hints.get(spec.name, 100))
            feeds[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
    return feeds
