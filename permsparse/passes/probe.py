"""Concrete shapes for every tensor, from one onnxruntime run on small random inputs.

The analysis needs the rank and the last dimension of every activation, and the resolved target shape of every Reshape.
Symbolic shape inference leaves many of these unknown for the legacy exporter (shapes computed by Shape→Gather→Concat
chains), so we run the model once at a tiny size (batch 1, a short sequence) with every intermediate tensor exposed. The
run also proves that the input model executes. Inputs with dynamic dimensions that cannot be guessed (image height,
say) must be given by the user.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from permsparse.errors import PermsparseError
from permsparse.onnxio import EXTERNAL_DATA_THRESHOLD, graph_inputs, model_size_bytes

log = logging.getLogger(__name__)

DEFAULT_BATCH = 1
DEFAULT_SEQ = 7  # odd and prime: never mistaken for a channel count


@dataclass(frozen=True)
class Probe:
    """Result of the probe run: the shape of every tensor and the values of small integer tensors."""

    shapes: Mapping[str, tuple[int, ...]]
    values: Mapping[str, np.ndarray]
    feeds: Mapping[str, np.ndarray]


def resolve_shapes(
    model: onnx.ModelProto,
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    *,
    batch: int = DEFAULT_BATCH,
    seq: int = DEFAULT_SEQ,
) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: user overrides, else static dims, batch for axis 0, ``seq`` for token-like inputs."""
    overrides = dict(overrides or {})
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in graph_inputs(model):
        if spec.name in overrides:
            shape = tuple(int(d) for d in overrides.pop(spec.name))
            if len(shape) != len(spec.shape) or any(
                isinstance(d, int) and d > 0 and d != s for d, s in zip(spec.shape, shape)
            ):
                raise PermsparseError(
                    f"input {spec.name!r}: shape {shape} does not match the model's declared shape {spec.shape}"
                )
            shapes[spec.name] = shape
            continue
        resolved = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                resolved.append(d)
            elif axis == 0:
                resolved.append(batch)
            elif axis == 1 and (np.issubdtype(spec.dtype, np.integer) or len(spec.shape) == 3):  # tokens, [B, S, C]
                resolved.append(seq)
            else:
                raise PermsparseError(
                    f"input {spec.name!r} has dynamic dimension {axis} ({d!r}) of shape {spec.shape} that cannot be "
                    f"guessed; give a concrete shape, e.g. --input-shape {spec.name}:"
                    + "x".join(str(x if isinstance(x, int) and x > 0 else 1) for x in spec.shape)
                )
        shapes[spec.name] = tuple(resolved)
    if overrides:
        names = ", ".join(s.name for s in graph_inputs(model))
        raise PermsparseError(f"unknown input(s) {sorted(overrides)}; the model's inputs are: {names}")
    return shapes


def vocab_hints(model: onnx.ModelProto) -> dict[str, int]:
    """For integer graph inputs used as Gather indices into a constant table: the table's row count."""
    inits = {t.name: t for t in model.graph.initializer}
    inputs = {s.name for s in graph_inputs(model)}
    alias: dict[str, str] = {n: n for n in inputs}
    hints: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Identity") and node.input and node.input[0] in alias:
            alias[node.output[0]] = alias[node.input[0]]
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in alias and node.input[0] in inits:
            rows = int(inits[node.input[0]].dims[0])
            name = alias[node.input[1]]
            hints[name] = min(hints.get(name, rows), rows)
    return hints


def random_feeds(
    model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs: normal floats; token ids below the embedding table's size; all-ones masks; zero type ids."""
    rng = np.random.default_rng(seed)
    hints = vocab_hints(model)
    feeds: dict[str, np.ndarray] = {}
    for spec in graph_inputs(model):
        shape = shapes[spec.name]
        lname = spec.name.lower()
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = np.ones(shape, dtype=np.bool_)
        elif "mask" in lname:
            feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif "type" in lname:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        elif "position" in lname:
            feeds[spec.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype)
        else:
            high = hints.get(spec.name, 100)
            feeds[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
    return feeds


class OrtRunner:
    """Runs a model in onnxruntime (CPU), optionally exposing intermediate tensors as outputs.

    ``model`` is a ``ModelProto`` (its external data, if any, read from ``base_dir``) or a path. The model is not
    modified: extra outputs go to a serialized copy; weights on disk are read by onnxruntime from their own file.
    """

    def __init__(
        self,
        model: onnx.ModelProto | str | Path,
        extra_outputs: list[str] | None = None,
        *,
        base_dir: str | Path | None = None,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        if isinstance(model, (str, Path)) and not extra_outputs:
            source: bytes | str = str(model)
        else:
            if isinstance(model, (str, Path)):
                base_dir = Path(model).parent
                model = onnx.load(str(model), load_external_data=False)
            source = self._serialize(model, extra_outputs or [], opts, base_dir)
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise PermsparseError(f"onnxruntime cannot load the model: {exc}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    @staticmethod
    def _serialize(model: onnx.ModelProto, extra_outputs: list[str], opts, base_dir) -> bytes:
        from permsparse.passes.graph import uses_external_data

        existing = {o.name for o in model.graph.output}
        added = [n for n in dict.fromkeys(extra_outputs) if n not in existing]
        model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in added)
        try:
            if uses_external_data(model):
                if base_dir is None:
                    raise PermsparseError("the model keeps weights in an external data file; its folder is needed")
                opts.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", str(Path(base_dir).resolve())
                )
            elif model_size_bytes(model) > EXTERNAL_DATA_THRESHOLD:
                raise PermsparseError("model over 2 GB held in memory: save it with external data first")
            return model.SerializeToString()
        finally:
            for _ in added:
                model.graph.output.pop()

    def run(self, feeds: Mapping[str, np.ndarray], names: list[str] | None = None) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(names, dict(feeds))
        except Exception as exc:
            raise PermsparseError(f"onnxruntime failed to run the model: {exc}") from None
        return dict(zip(names or self.output_names, values))

    def close(self) -> None:
        del self.session


def probe(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, runner: OrtRunner | None = None,
    base_dir: str | Path | None = None,
) -> Probe:
    """Run ``model`` once on ``feeds`` exposing every node output; return all shapes and small integer values.

    ``runner``: an :class:`OrtRunner` of ``model`` made with :func:`probe_runner` (to reuse its session).
    """
    own = runner is None
    runner = runner or probe_runner(model, base_dir=base_dir)
    try:
        results = runner.run(feeds)
    finally:
        if own:
            runner.close()
    shapes: dict[str, tuple[int, ...]] = {k: tuple(int(d) for d in np.shape(v)) for k, v in results.items()}
    values = {
        k: np.asarray(v)
        for k, v in results.items()
        if np.issubdtype(np.asarray(v).dtype, np.integer) and np.size(v) <= 4096
    }
    for name, arr in feeds.items():
        shapes[name] = tuple(arr.shape)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    return Probe(shapes=shapes, values=values, feeds=dict(feeds))


def probe_runner(model: onnx.ModelProto, *, base_dir: str | Path | None = None) -> OrtRunner:
    """A session of ``model`` exposing every node output (for :func:`probe`; graph outputs can be asked by name)."""
    return OrtRunner(model, [o for n in model.graph.node for o in n.output if o], base_dir=base_dir)
