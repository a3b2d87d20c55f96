"""Input shapes: one syntax for every verb, and optimization profiles derived from a model's dynamic axes.

``--shapes NAME:DIMS`` fixes one shape, ``--shapes NAME:MIN,OPT,MAX`` gives an optimization profile. DIMS is
``1x128`` (trtexec) or ``[1,128]`` (Polygraphy); several inputs may be given in one argument separated by spaces or
``;``. trtexec's ``--minShapes/--optShapes/--maxShapes=name:1x8,mask:1x8`` and Polygraphy's ``--input-shapes
name:[1,128]`` are accepted too (:func:`merge_profile_args`). Dynamic axes the user did not give are filled from
other inputs sharing the same ``dim_param`` (``batch``, ``sequence``...), then from defaults by axis name; anything
else must be given, and the error says how.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from permsparse.errors import UsageError
from permsparse.ir.inputs import Dim, InputSpec, ShapeSpec

#: Defaults (min, opt, max) for dynamic axes by name; matched case-insensitively against the dim_param.
BATCH_DEFAULT: tuple[int, int, int] = (1, 1, 32)
SEQUENCE_DEFAULT: tuple[int, int, int] = (1, 128, 512)
_BATCH_RE = re.compile(r"batch|^n$|^b$|^bs$", re.IGNORECASE)
_SEQ_RE = re.compile(r"seq|sequence|length|len|token|position|past|total|^s$|^t$", re.IGNORECASE)


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
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"shape of {where}: '{text}' must be positive integers (an axis of size 0 holds no data)")
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
