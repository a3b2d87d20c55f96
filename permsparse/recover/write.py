"""Write recovered values back into the student's initializers: same graph, same nodes, the model's own dtype.

Check (then write). Every new value is cast to its initializer's dtype (fp16/bf16 models were trained on fp32
master copies); every masked weight must be N:M along its K axis and zero wherever the student's was (the mask kept
frozen), and the output's graph — nodes, inputs, outputs, initializer names, shapes and types — must equal the
student's. The model is written atomically by :func:`permsparse.ir.save.save_model` (streamed into an external data
file when the student keeps its weights externally), then read back and checked again; a failing output is removed.

Invariant: the written model differs from the student only in the values of the trainable initializers and in
``permsparse.recover.*`` metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from permsparse.errors import VerificationError
from permsparse.recover.model import Trainable

log = logging.getLogger(__name__)


def graph_signature(model: onnx.ModelProto) -> tuple:
    g = model.graph
    return (
        tuple(n.SerializeToString(deterministic=True) for n in g.node),
        tuple(i.SerializeToString(deterministic=True) for i in g.input),
        tuple(o.SerializeToString(deterministic=True) for o in g.output),
        tuple((t.name, tuple(t.dims), t.data_type) for t in g.initializer),
    )


def cast_values(values: Mapping[str, np.ndarray], trainable: Trainable, n: int, m: int) -> dict[str, np.ndarray]:
    """Values in their initializers' dtypes, each masked weight checked N:M and zero where the student's was."""
    from permsparse.pattern import check_nm

    out = {}
    for name, v in values.items():
        arr = np.asarray(v, dtype=np.float32).astype(trainable.dtypes[name])
        if name in trainable.masked:
            _, keep, k_axis = trainable.masked[name]
            if np.any(np.asarray(arr, dtype=np.float32)[~keep] != 0):
                raise VerificationError(f"recovered weight {name} has non-zero pruned entries; nothing written")
            if not check_nm(arr, k_axis, n, m):
                raise VerificationError(f"recovered weight {name} is not {n}:{m}; nothing written")
        if not np.all(np.isfinite(np.asarray(arr, dtype=np.float32))):
            raise VerificationError(f"recovered tensor {name} is not finite; nothing written")
        out[name] = arr
    return out


def write_model(src: Path, dst: Path, values: Mapping[str, np.ndarray], trainable: Trainable, n: int, m: int,
                metadata: Mapping[str, str]) -> Path:
    """Write the student ``src`` with ``values`` substituted to ``dst`` (see the module docstring)."""
    from permsparse.ir.external import uses_external_data
    from permsparse.ir.save import data_file_of, save_model

    new = cast_values(values, trainable, n, m)
    header = onnx.load(str(src), load_external_data=False)
    before = graph_signature(header)
    external = uses_external_data(header)
    if external:
        model = header
        transform = {name: (lambda _old, a=arr: a) for name, arr in new.items()}
    else:
        model = onnx.load(str(src))
        for t in model.graph.initializer:
            if t.name in new:
                t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new[t.name]), t.name))
        transform = None
    keep = [p for p in model.metadata_props if not p.key.startswith("permsparse.recover.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in metadata.items():
        e = model.metadata_props.add()
        e.key, e.value = f"permsparse.recover.{k}", str(v)
    if graph_signature(model) != before:
        raise VerificationError("the recovered model's graph differs from the student's; nothing written (a bug)")
    if external:
        save_model(model, dst, external_data=True, base_dir=src.parent, transform=transform)
    else:
        save_model(model, dst, external_data=False)
    try:
        _check_written(dst, before, new, trainable, n, m)
    except Exception:
        dst.unlink(missing_ok=True)
        if external:
            data_file_of(dst).unlink(missing_ok=True)
        raise
    return dst


def _check_written(dst: Path, before: tuple, new: Mapping[str, np.ndarray], trainable: Trainable, n: int,
                   m: int) -> None:
    from permsparse.ir.model import weight_values
    from permsparse.pattern import check_nm

    written = onnx.load(str(dst), load_external_data=False)
    if graph_signature(written) != before:
        raise VerificationError(f"{dst}: the written graph differs from the student's; removed")
    inits = {t.name: t for t in written.graph.initializer}
    for name, (_, keep, k_axis) in trainable.masked.items():
        arr = np.asarray(weight_values(inits[name], dst.parent))
        if not check_nm(arr, k_axis, n, m) or np.any(np.asarray(arr, dtype=np.float32)[~keep] != 0):
            raise VerificationError(f"{dst}: weight {name} is not {n}:{m} with the student's mask after writing; "
                                    "removed")


__all__ = ["cast_values", "graph_signature", "write_model"]
