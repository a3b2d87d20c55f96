"""onnxruntime sessions: the one factory every verb uses (checks, probing, calibration, metrics, bench).

:class:`Session` opens a model given as a path or a ``ModelProto`` without modifying it: extra outputs (intermediate
tensors to observe) are added to a serialized copy; weights kept in external data are read by onnxruntime from the
model's own folder (never copied into memory twice); a model too big for one protobuf is written with external data
to a temporary folder. Errors from onnxruntime become one-line :class:`PermsparseError` messages.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from permsparse.errors import PermsparseError
from permsparse.ir.external import uses_external_data
from permsparse.ir.model import EXTERNAL_DATA_THRESHOLD, model_size_bytes

log = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:400] if text else type(exc).__name__


class Session:
    """An onnxruntime CPU session of ``model`` (a path or a ``ModelProto``), optionally exposing intermediate
    tensors as outputs.

    ``base_dir`` is the folder of a ``ModelProto``'s external data (default: the model file's folder). ``optimize``
    turns onnxruntime's graph optimizations on (benchmarks); checks and probes run the graph as written.
    """

    def __init__(
        self,
        model: onnx.ModelProto | str | os.PathLike[str],
        extra_outputs: Sequence[str] | None = None,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        optimize: bool = False,
    ):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.upcast = False  # True: this session runs a float32 copy of a 16-bit model (see _open)
        extra = list(dict.fromkeys(extra_outputs or []))
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not path.is_file():
                raise PermsparseError(f"{path}: no such model file")
            base_dir = path.resolve().parent
            if not extra:
                source: bytes | str = str(path)
            else:
                source = self._serialize(onnx.load(str(path), load_external_data=False), extra, opts, base_dir)
        else:
            source = self._serialize(model, extra, opts, base_dir)
        self.session = self._open(source, model, extra, opts, base_dir)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _open(self, source: bytes | str, model, extra: list[str], opts: Any, base_dir):
        """The session; for a 16-bit model with an op onnxruntime's CPU provider has no 16-bit kernel for (most ops
        in bfloat16, e.g. ``Where``), a session of its exact float32 copy (:func:`permsparse.ir.upcast.upcast_model`):
        feeds are widened and outputs come back as float32."""
        import onnxruntime as ort

        from permsparse.ir.upcast import is_half_model, upcast_model

        try:
            return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = _first_line(exc)
            proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, os.PathLike)) \
                else model
            if "NOT_IMPLEMENTED" not in first or not is_half_model(proto):
                raise PermsparseError(f"onnxruntime cannot load the model: {first}") from None
        log.info("onnxruntime has no 16-bit kernel for an op of this model (%s): running its float32 copy", first)
        copy = upcast_model(proto, base_dir)
        self.upcast = True
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        try:
            return ort.InferenceSession(self._serialize(copy, extra, opts, base_dir), opts,
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise PermsparseError(f"onnxruntime cannot load the model: {_first_line(exc)}") from None

    def _serialize(self, model: onnx.ModelProto, extra: list[str], opts: Any, base_dir) -> bytes | str:
        existing = {o.name for o in model.graph.output}
        added = [n for n in extra if n not in existing]
        model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in added)
        try:
            if uses_external_data(model):
                if base_dir is None:
                    raise PermsparseError(
                        "the model keeps weights in an external data file but its folder is unknown; pass its path"
                    )
                opts.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", str(Path(base_dir).resolve())
                )
                return model.SerializeToString()
            if model_size_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
                return model.SerializeToString()
            self._tmp = tempfile.TemporaryDirectory(prefix="permsparse-session-")
            copy_path = os.path.join(self._tmp.name, "model.onnx")
            onnx.save(model, copy_path, save_as_external_data=True, all_tensors_to_one_file=True,
                      location="model.onnx.data")
            return copy_path
        finally:
            for _ in added:
                model.graph.output.pop()

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run on ``feeds`` (extra keys are ignored); returns ``{name: value}`` for ``names`` (default: all outputs)."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise PermsparseError(f"the inputs lack {missing}; the model takes {self.input_names}")
        run_feed = {n: np.asarray(feeds[n]) for n in self.input_names}
        if self.upcast:
            from permsparse.ir.upcast import upcast_feeds

            run_feed = upcast_feeds(run_feed)
        try:
            values = self.session.run(list(names) if names is not None else None, run_feed)
        except Exception as exc:
            raise PermsparseError(f"onnxruntime failed to run the model: {_first_line(exc)}") from None
        return dict(zip(list(names) if names is not None else self.output_names, values))

    def run_all(self, feeds: Iterable[Mapping[str, np.ndarray]], names: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
        return [self.run(f, names) for f in feeds]

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_outputs(
    model: onnx.ModelProto | str | os.PathLike[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    base_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Graph outputs of ``model`` for each feed (one session, closed afterwards)."""
    with Session(model, base_dir=base_dir) as sess:
        return sess.run_all(feeds)
