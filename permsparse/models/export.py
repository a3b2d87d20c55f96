"""Export PyTorch modules to ONNX with either torch exporter, atomically and quietly.

Both exporters (``dynamo=True``: torch.export + onnxscript; ``dynamo=False``: the legacy TorchScript tracer) turn
every ``nn.Linear`` into ``MatMul(x, W[K, N])`` with ``W`` a constant initializer (followed by ``Add(bias)``), which
is the form the rest of permsparse prunes. :func:`export_onnx` checks that after export.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from permsparse.errors import PermsparseError

logger = logging.getLogger(__name__)

#: Models whose weights exceed this many bytes are saved with ONNX external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = int(1.8e9)

_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def quiet_export() -> Iterator[io.StringIO]:
    """Silence the exporters' warnings, log chatter and prints; what was printed is kept and logged at DEBUG."""
    saved = {}
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = lg.level
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if buf.getvalue().strip():
            logger.debug("exporter output:\n%s", buf.getvalue())


def module_weight_bytes(module: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers of ``module`` (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def count_linear(module: nn.Module) -> int:
    """Number of ``nn.Linear`` submodules."""
    return sum(1 for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class LinearMatMul:
    """A ``MatMul(x, W)`` whose B input is a constant rank-2 initializer ``W [K, N]``."""

    node: str
    weight: str
    shape: tuple[int, ...]


def linear_matmuls(model: onnx.ModelProto) -> list[LinearMatMul]:
    """MatMul nodes whose B input is a rank-2 initializer (or Constant), in graph order. Weights need not be loaded."""
    consts: dict[str, tuple[int, ...]] = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t is not None:
                    consts[node.output[0]] = tuple(attr.t.dims)
    found = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and len(consts.get(node.input[1], ())) == 2:
            found.append(LinearMatMul(node.name, node.input[1], consts[node.input[1]]))
    return found


def _ordered_inputs(module: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Example inputs in the order of ``module.forward``'s parameters (the legacy exporter passes them positionally)."""
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = [k for k in example_inputs if k not in params]
    if unknown:
        raise PermsparseError(
            f"example inputs {unknown} are not parameters of {type(module).__name__}.forward{tuple(params)}; "
            "name the example inputs after the forward() arguments."
        )
    return {k: example_inputs[k] for k in params if k in example_inputs}


def _dynamic_shapes(
    inputs: Mapping[str, torch.Tensor], dynamic_axes: Mapping[str, Mapping[int, str]]
) -> dict[str, dict[int, Any] | None]:
    """``dynamic_axes`` (names per axis) → ``dynamic_shapes`` for torch.export, one ``Dim`` per distinct name."""
    dims: dict[str, Any] = {}
    shapes: dict[str, dict[int, Any] | None] = {}
    for name, tensor in inputs.items():
        axes = dynamic_axes.get(name)
        if not axes:
            shapes[name] = None
            continue
        spec = {}
        for axis, dim_name in axes.items():
            if tensor.shape[axis] < 2:
                raise PermsparseError(
                    f"example input {name!r} has size {tensor.shape[axis]} on dynamic axis {axis} ({dim_name}); "
                    "torch.export specialises sizes 0 and 1: use example inputs with at least 2 there."
                )
            if dim_name not in dims:
                dims[dim_name] = torch.export.Dim(dim_name)
            spec[int(axis)] = dims[dim_name]
        shapes[name] = spec
    return shapes


def _name_output_dims(model: onnx.ModelProto, dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """Give the graph outputs' dynamic axes the requested symbolic names."""
    for out in model.graph.output:
        axes = dynamic_axes.get(out.name)
        if not axes:
            continue
        dims = out.type.tensor_type.shape.dim
        for axis, dim_name in axes.items():
            if axis >= len(dims):
                logger.warning("output %s has no axis %d; cannot name it %s", out.name, axis, dim_name)
            elif dims[axis].HasField("dim_value"):
                logger.warning(
                    "output %s axis %d is static (%d) in the exported graph, expected dynamic %r",
                    out.name, axis, dims[axis].dim_value, dim_name,
                )
            else:
                dims[axis].dim_param = dim_name


def _external_locations(model: onnx.ModelProto) -> set[str]:
    locations = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for kv in init.external_data:
                if kv.key == "location":
                    locations.add(kv.value)
    return locations


def export_onnx(
    module: nn.Module,
    example_inputs: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    dynamo: bool,
    dynamic_axes: dict[str, dict[int, str]],
    output_names: list[str],
    opset: int = 18,
    external_data: bool | None = None,
) -> Path:
    """Export ``module`` called as ``module(**example_inputs)`` to ``path`` and return ``path``.

    ``dynamic_axes`` maps input *and output* names to ``{axis: symbolic name}``; with ``dynamo=True`` it becomes
    ``dynamic_shapes`` of ``torch.export.Dim`` (one per distinct name), with ``dynamo=False`` it is passed as is.
    The file is written atomically (a temporary directory beside ``path``, then renames). ``external_data``:
    ``None`` = only when the weights exceed ~1.8 GB; the weights then go to one file ``<path.name>.data`` beside
    ``path``. After export, checks that every ``nn.Linear`` became ``MatMul(x, W[K, N])`` with a constant ``W``
    and logs a warning when not.
    """
    path = Path(path)
    if path.is_dir():
        raise PermsparseError(f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    inputs = _ordered_inputs(module, example_inputs)
    known = set(inputs) | set(output_names)
    stray = [k for k in dynamic_axes if k not in known]
    if stray:
        raise PermsparseError(f"dynamic_axes names {stray} are neither inputs {list(inputs)} nor outputs {output_names}.")
    weight_bytes = module_weight_bytes(module)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    data_name = path.name + ".data"
    exporter = "dynamo" if dynamo else "legacy"

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    staged = tmp / path.name
    start = time.perf_counter()
    try:
        with quiet_export(), torch.no_grad():
            try:
                if dynamo:
                    program = torch.onnx.export(
                        module,
                        (),
                        kwargs=inputs,
                        dynamo=True,
                        dynamic_shapes=_dynamic_shapes(inputs, dynamic_axes),
                        input_names=list(inputs),
                        output_names=list(output_names),
                        opset_version=opset,
                        external_data=external,
                        optimize=True,
                        verbose=False,
                        report=False,
                    )
                    program.save(staged, external_data=external)
                    del program
                else:
                    torch.onnx.export(
                        module,
                        tuple(inputs.values()),
                        str(staged),
                        dynamo=False,
                        input_names=list(inputs),
                        output_names=list(output_names),
                        dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                        opset_version=opset,
                        do_constant_folding=True,
                        verbose=False,
                    )
            except PermsparseError:
                raise
            except Exception as exc:
                other = "legacy" if dynamo else "dynamo"
                raise PermsparseError(
                    f"the {exporter} torch exporter failed on {type(module).__name__}: {type(exc).__name__}: {exc}\n"
                    f"Try the other exporter (--exporter {other})."
                ) from exc
        export_s = time.perf_counter() - start

        model = onnx.load(str(staged), load_external_data=False)
        _name_output_dims(model, dynamic_axes)
        _check_linears(model, module, exporter)
        locations = _external_locations(model)
        if external:
            if locations != {data_name}:
                # The legacy exporter writes one file per tensor: gather them into one <name>.data.
                onnx.load_external_data_for_model(model, str(tmp))
                for f in tmp.iterdir():
                    f.unlink()
                onnx.save_model(
                    model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024,
                )
            else:
                onnx.save_model(model, str(staged))
            if (tmp / data_name).is_file():  # absent only when every tensor is tiny
                _publish(tmp / data_name, path.parent / data_name)
        else:
            if locations:
                onnx.load_external_data_for_model(model, str(tmp))
            onnx.save_model(model, str(staged))
        _publish(staged, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "exported %s with the %s exporter to %s in %.1f s (%.1f MB of weights%s)",
        type(module).__name__, exporter, path, export_s, weight_bytes / 1e6, f", external {data_name}" if external else "",
    )
    return path


def _publish(src: Path, dst: Path) -> None:
    """Atomically move ``src`` over ``dst`` with ordinary file permissions (temp files may be created 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(src, 0o666 & ~umask)
    os.replace(src, dst)


def _check_linears(model: onnx.ModelProto, module: nn.Module, exporter: str) -> None:
    n_linear = count_linear(module)
    found = linear_matmuls(model)
    if len(found) >= n_linear:
        logger.debug("%d nn.Linear -> %d MatMul(x, W[K, N]) with constant W", n_linear, len(found))
        return
    gemms = sum(1 for n in model.graph.node if n.op_type == "Gemm")
    logger.warning(
        "%s exporter: %d nn.Linear modules but only %d MatMul(x, W) with a constant 2-D W (%d Gemm nodes); "
        "the others are unused (e.g. a pooler) or read their weight through another op (e.g. a Transpose of a "
        "tied embedding) and will not be pruned.",
        exporter, n_linear, len(found), gemms,
    )


def summarize_onnx(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Cheap facts about an ONNX file (weights are not loaded): nodes, linear MatMuls, inputs/outputs, bytes."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)

    def shape(v: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    data = path.with_name(path.name + ".data")
    return {
        "path": str(path),
        "nodes": len(model.graph.node),
        "linear_matmuls": len(linear_matmuls(model)),
        "inputs": {i.name: shape(i) for i in model.graph.input},
        "outputs": {o.name: shape(o) for o in model.graph.output},
        "bytes": path.stat().st_size + (data.stat().st_size if data.is_file() and _external_locations(model) else 0),
        "external_data": bool(_external_locations(model)),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
    }
