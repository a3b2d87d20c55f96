"""Graph inputs: one input record, one shape syntax, one random-feed builder — for every verb.

Shapes. ``--shapes NAME:DIMS`` fixes one shape, ``--shapes NAME:MIN,OPT,MAX`` gives an optimization profile. DIMS is
``1x128`` (trtexec) or ``[1,128]`` (Polygraphy); several inputs may be given in one argument separated by spaces or
``;``. trtexec's ``--minShapes/--optShapes/--maxShapes=name:1x8,mask:1x8`` and Polygraphy's ``--input-shapes
name:[1,128]`` are accepted too (:func:`merge_profile_args`). Dynamic axes the user did not give are filled from
other inputs sharing the same ``dim_param`` (``batch``, ``sequence``...), then from defaults by axis name; anything
else must be given, and the error says how.

Feeds. :func:`random_feeds` fills every input for checks and benchmarks: normal floats, token ids below the
embedding table's size (:func:`vocab_hints`, the one vocabulary finder), all-ones masks, zero type ids, positions.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from permsparse.errors import PermsparseError, UsageError

logger = logging.getLogger(__name__)

Dim = int | str | None  # static size, named dynamic axis, or anonymous dynamic axis

#: Defaults (min, opt, max) for dynamic axes by name; matched case-insensitively against the dim_param.
BATCH_DEFAULT: tuple[int, int, int] = (1, 1, 32)
SEQUENCE_DEFAULT: tuple[int, int, int] = (1, 128, 512)
_BATCH_RE = re.compile(r"batch|^n$|^b$|^bs$", re.IGNORECASE)
_SEQ_RE = re.compile(r"seq|sequence|length|len|token|position|past|total|^s$|^t$", re.IGNORECASE)

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


def graph_inputs(model: onnx.ModelProto | str | os.PathLike[str]) -> list[InputSpec]:
    """The graph inputs that are not initializers (a path is read without its weights)."""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise PermsparseError(f"model file {str(path)!r} does not exist")
        model = onnx.load(str(path), load_external_data=False)
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


# ------------------------------------------------------------------------------------------------- shape syntax


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


def _parse_dims(text: str, where: str) -> tuple[int, ...]:
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        parts = [p for p in body[1:-1].split(",") if p.strip()]
    else:
        parts = body.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(
            f"shape of {where}: '{text}' is not a shape; write 4x128 (trtexec) or [4,128] (Polygraphy)"
        ) from None
    if not dims or any(d < 0 for d in dims):
        raise UsageError(f"shape of {where}: '{text}' must be non-negative integers")
    return dims


def _split_shapes(spec: str) -> list[str]:
    """Split ``a,b,c`` on the commas that are not inside ``[...]``."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def parse_shape_arg(arg: str) -> ShapeSpec:
    """``name:DIMS`` or ``name:MIN,OPT,MAX``; the name may itself contain ':' (the ':' before the dims splits)."""
    match = re.match(r"^(?P<name>.*):(?P<spec>[^:]+)$", arg.strip())
    if match and not match.group("name").strip():
        raise UsageError(f"--shapes '{arg}': the input name before ':' is empty")
    if not match:
        raise UsageError(
            f"--shapes '{arg}': expected NAME:SHAPE (input_ids:1x128 or input_ids:[1,128]) or NAME:MIN,OPT,MAX "
            "(input_ids:1x8,4x128,8x512)"
        )
    name, spec = match.group("name").strip(), match.group("spec")
    pieces = _split_shapes(spec)
    if len(pieces) == 1:
        return ShapeSpec.fixed(name, _parse_dims(pieces[0], name))
    if len(pieces) == 3:
        lo, mid, hi = (_parse_dims(p, name) for p in pieces)
        return ShapeSpec(name, lo, mid, hi)
    if spec.strip().startswith("[") and len(pieces) > 1 and all(p.strip().lstrip("-").isdigit() for p in pieces):
        return ShapeSpec.fixed(name, _parse_dims(spec, name))
    raise UsageError(f"--shapes '{arg}': give one shape or three (min,opt,max) separated by commas")


def parse_shapes(args: Iterable[str] | None) -> dict[str, ShapeSpec]:
    """Parse several ``--shapes`` arguments (each may hold several specs separated by spaces or ';')."""
    out: dict[str, ShapeSpec] = {}
    for arg in args or ():
        for piece in re.split(r";|\s+(?![^\[]*\])", arg.strip()):
            if not piece.strip():
                continue
            spec = parse_shape_arg(piece)
            if spec.name in out:
                raise UsageError(f"--shapes: input '{spec.name}' given twice")
            out[spec.name] = spec
    return out


def _parse_trtexec(arg: str, flag: str) -> dict[str, tuple[int, ...]]:
    """trtexec's ``name:1x8,mask:1x8`` (comma separates inputs)."""
    out: dict[str, tuple[int, ...]] = {}
    for piece in _split_shapes(arg):
        if not piece.strip():
            continue
        name, sep, dims = piece.strip().rpartition(":")
        if not sep or not name:
            raise UsageError(f"--{flag} '{arg}': expected name:1x8[,name2:1x8]")
        out[name.strip("'\"")] = _parse_dims(dims, name)
    return out


def merge_profile_args(
    shapes: Iterable[str] | None = None,
    min_shapes: Iterable[str] | None = None,
    opt_shapes: Iterable[str] | None = None,
    max_shapes: Iterable[str] | None = None,
) -> dict[str, ShapeSpec]:
    """One profile dict from ``--shapes`` and trtexec's ``--minShapes/--optShapes/--maxShapes`` (opt required)."""
    out = parse_shapes(shapes)
    lo: dict[str, tuple[int, ...]] = {}
    mid: dict[str, tuple[int, ...]] = {}
    hi: dict[str, tuple[int, ...]] = {}
    for target, args, flag in ((lo, min_shapes, "minShapes"), (mid, opt_shapes, "optShapes"), (hi, max_shapes, "maxShapes")):
        for arg in args or ():
            target.update(_parse_trtexec(arg, flag))
    for name in set(lo) | set(mid) | set(hi):
        if name in out:
            raise UsageError(f"input '{name}' given both in --shapes and in --min/opt/maxShapes")
        opt = mid.get(name) or hi.get(name) or lo.get(name)
        assert opt is not None
        out[name] = ShapeSpec(name, lo.get(name, opt), opt, hi.get(name, opt))
    return out


# ------------------------------------------------------------------------------------------------- resolution


def _default_for(axis: int, dim: Dim) -> tuple[int, int, int] | None:
    if isinstance(dim, str):
        if _BATCH_RE.search(dim):
            return BATCH_DEFAULT
        if _SEQ_RE.search(dim):
            return SEQUENCE_DEFAULT
        return None
    return BATCH_DEFAULT if axis == 0 else None


def derive_profiles(
    inputs: Sequence[InputSpec],
    user: Mapping[str, ShapeSpec] | None = None,
    defaults: Mapping[str, tuple[int, int, int]] | None = None,
) -> dict[str, ShapeSpec]:
    """One :class:`ShapeSpec` per input (static inputs get their fixed shape).

    Order of precedence for each dynamic axis: the user's shape for that input; the same ``dim_param`` in another
    input the user gave; ``defaults[dim_param]``; the built-in batch/sequence defaults. Raises naming the input and
    axis when none applies, or when a user shape contradicts a static dim.
    """
    user = dict(user or {})
    defaults = dict(defaults or {})
    names = {i.name for i in inputs}
    unknown = sorted(set(user) - names)
    if unknown:
        raise UsageError(
            f"--shapes names unknown input(s) {', '.join(unknown)}; the model's inputs are: {', '.join(sorted(names))}"
        )
    by_param: dict[str, tuple[int, int, int]] = {}
    for inp in inputs:
        spec = user.get(inp.name)
        if spec is None:
            continue
        if len(spec.min) != len(inp.dims):
            raise UsageError(
                f"--shapes {inp.name}: rank {len(spec.min)} but the model's input has rank {len(inp.dims)} "
                f"({_describe(inp)})"
            )
        for axis, d in enumerate(inp.dims):
            triple = (spec.min[axis], spec.opt[axis], spec.max[axis])
            if isinstance(d, int) and d > 0 and triple != (d, d, d):
                raise UsageError(
                    f"--shapes {inp.name}: axis {axis} is fixed to {d} in the model, got {triple[0]},{triple[1]},"
                    f"{triple[2]}"
                )
            if isinstance(d, str):
                prev = by_param.setdefault(d, triple)
                if prev != triple:
                    raise UsageError(
                        f"--shapes: axis '{d}' is shared by several inputs but given as {prev} and {triple}"
                    )
    out: dict[str, ShapeSpec] = {}
    for inp in inputs:
        if inp.name in user:
            out[inp.name] = user[inp.name]
            continue
        lo, mid, hi = [], [], []
        for axis, d in enumerate(inp.dims):
            if isinstance(d, int) and d > 0:
                triple: tuple[int, int, int] | None = (d, d, d)
            elif isinstance(d, str) and d in by_param:
                triple = by_param[d]
            elif isinstance(d, str) and d in defaults:
                triple = defaults[d]
            else:
                triple = _default_for(axis, d)
            if triple is None:
                raise UsageError(
                    f"input '{inp.name}' {_describe(inp)} has dynamic axis {axis} ('{d or '?'}') with no default; "
                    f"give its shape, e.g. --shapes {inp.name}:"
                    + "x".join(str(x if isinstance(x, int) and x > 0 else 1) for x in inp.dims)
                )
            if isinstance(d, str):
                by_param.setdefault(d, triple)
            lo.append(triple[0])
            mid.append(triple[1])
            hi.append(triple[2])
        out[inp.name] = ShapeSpec(inp.name, tuple(lo), tuple(mid), tuple(hi))
    return out


def _describe(inp: InputSpec) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in inp.dims) + "]"


def format_profiles(profiles: Mapping[str, ShapeSpec]) -> str:
    return " ".join(str(s) for s in profiles.values())


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
