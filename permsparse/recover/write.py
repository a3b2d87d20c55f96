"""Write recovered values back into the student's initializers: same graph, same nodes, the model's own dtype.

Check (then write). A masked weight's value is given as its kept entries and scattered into zeros at the student's
mask here, one weight at a time (so no second full copy of the weights is held); every new value is cast to its
initializer's dtype (fp16/bf16 models were trained on fp32 master copies); every masked weight must be N:M along its
K axis and zero wherever the student's was (the mask kept frozen), and the output's graph — nodes, inputs, outputs, initializer names, shapes and types — must equal the
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


def cast_value(name: str, v: np.ndarray, trainable: Trainable, n: int, m: int) -> np.ndarray:
    """One value in its initializer's dtype (a masked weight given as its kept entries is scattered into zeros at
    the student's mask first), checked: finite, and for a masked weight N:M and zero where the student's was."""
    from permsparse.pattern import check_nm

    v = np.asarray(v, dtype=np.float32)
    if name in trainable.masked:
        _, keep, k_axis = trainable.masked[name]
        if v.shape != keep.shape:
            if v.ndim != 1 or v.size != int(keep.sum()):
                raise VerificationError(f"recovered weight {name} has {v.size} values for {int(keep.sum())} kept "
                                        "entries; nothing written (a bug)")
            dense = np.zeros(keep.shape, dtype=np.float32)
            dense[keep] = v
            v = dense
    arr = v.astype(trainable.dtypes[name])
    if name in trainable.masked:
        _, keep, k_axis = trainable.masked[name]
        if np.any(np.asarray(arr, dtype=np.float32)[~keep] != 0):
            raise VerificationError(f"recovered weight {name} has non-zero pruned entries; nothing written")
        if not check_nm(arr, k_axis, n, m):
            raise VerificationError(f"recovered weight {name} is not {n}:{m}; nothing written")
    if not np.all(np.isfinite(np.asarray(arr, dtype=np.float32))):
        raise VerificationError(f"recovered tensor {name} is not finite; nothing written")
    return arr


def cast_values(values: Mapping[str, np.ndarray], trainable: Trainable, n: int, m: int) -> dict[str, np.ndarray]:
    """Every value through :func:`cast_value` (all at once: for small models and tests)."""
    return {name: cast_value(name, v, trainable, n, m) for name, v in values.items()}


def write_model(src: Path, dst: Path, values: Mapping[str, np.ndarray], trainable: Trainable, n: int, m: int,
                metadata: Mapping[str, str]) -> Path:
    """Write the student ``src`` with ``values`` substituted to ``dst`` (see the module docstring)."""
    from permsparse.ir.external import uses_external_data
    from permsparse.ir.save import data_file_of, save_model

    model = onnx.load(str(src), load_external_data=False)  # embedded weights: the whole model
    before = graph_signature(model)
    external = uses_external_data(model)
    names = {t.name for t in model.graph.initializer}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise VerificationError(f"recovered tensors {unknown[:3]} are not initializers of {src}; nothing written")
    if external:  # cast and checked while streaming into the temporary output; a failure leaves nothing written
        transform = {name: (lambda _old, name=name: cast_value(name, values[name], trainable, n, m))
                     for name in values}
    else:  # one tensor at a time: its old bytes are freed as the new ones replace them
        for t in model.graph.initializer:
            if t.name in values:
                arr = np.ascontiguousarray(cast_value(t.name, values[t.name], trainable, n, m))
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
                del arr
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
    del model
    try:
        _check_written(dst, before, trainable, n, m)
    except Exception:
        dst.unlink(missing_ok=True)
        if external:
            data_file_of(dst).unlink(missing_ok=True)
        raise
    return dst


def _check_written(dst: Path, before: tuple, trainable: Trainable, n: int, m: int) -> None:
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


__all__ = ["cast_value", "cast_values", "graph_signature", "write_model"]
