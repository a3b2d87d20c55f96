"""``tensorrt``: engines built by ``permsparse build`` (or given as ``.plan``), run with ``execute_async_v3`` on torch
CUDA buffers (GPU only; datacenter ``tensorrt`` or ``tensorrt_rtx``, whichever imports)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from permsparse.errors import PermsparseError
from permsparse.runtime.backends.base import Runner, register_backend, require_cuda

logger = logging.getLogger(__name__)


@register_backend("tensorrt", "TensorRT / TensorRT-RTX engines with 2:4 sparse tactics (GPU)")
class TensorRTRunner(Runner):
    """One engine with torch CUDA buffers, run by ``execute_async_v3`` on a private stream."""

    def activate(self) -> None:
        if self.active:
            return
        torch = require_cuda("tensorrt")
        from permsparse.runtime.trt import import_tensorrt

        self.trt = import_tensorrt()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self._engine_bytes())
        if self.engine is None:
            raise PermsparseError("TensorRT could not deserialize the engine (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.active = True

    def _engine_bytes(self) -> bytes:
        if self.path.suffix in (".plan", ".engine", ".trt"):
            return self.path.read_bytes()
        from permsparse.runtime.trt import BuildConfig, build_engine

        with tempfile.TemporaryDirectory(prefix="permsparse-bench-") as tmp:
            out = Path(tmp) / (self.path.stem + ".plan")
            cfg = self.config
            report = build_engine(self.path, out, BuildConfig(precision=cfg.precision or "fp16", shapes=cfg.shapes,
                                                              workspace_gb=cfg.workspace_gb))
            logger.info("%s", report.summary())
            return out.read_bytes()

    def _torch_dtype(self, dt: Any) -> Any:
        import torch

        D = self.trt.DataType
        table = {D.FLOAT: torch.float32, D.HALF: torch.float16, D.INT32: torch.int32, D.INT8: torch.int8, D.BOOL: torch.bool}
        for name, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
            if hasattr(D, name):
                table[getattr(D, name)] = tdt
        return table[dt]

    def _stage(self, feeds: Mapping[str, np.ndarray]) -> None:
        import torch

        mode = self.trt.TensorIOMode
        for name in self.names:
            if self.engine.get_tensor_mode(name) == mode.INPUT:
                if name not in feeds:
                    raise PermsparseError(f"engine input '{name}' has no data; give its shape with --shapes")
                dt = self._torch_dtype(self.engine.get_tensor_dtype(name))
                t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda").to(dt).contiguous()
                self.inputs[name] = t
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
        for name in self.names:
            if self.engine.get_tensor_mode(name) == mode.OUTPUT:
                shape = tuple(self.context.get_tensor_shape(name))
                t = torch.empty(shape, dtype=self._torch_dtype(self.engine.get_tensor_dtype(name)), device="cuda")
                self.outputs[name] = t
                self.context.set_tensor_address(name, t.data_ptr())

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise PermsparseError("TensorRT execute_async_v3 failed")

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.activate()
        self._stage(feeds)
        self._execute()
        self._stream.synchronize()
        return {k: t.float().cpu().numpy() for k, t in self.outputs.items()}

    def bind(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        self.activate()
        self._stage(feeds)
        return self._execute

    @property
    def on_cuda(self) -> bool:
        return True

    @property
    def stream(self) -> Any | None:
        return getattr(self, "_stream", None)

    @property
    def device_name(self) -> str:
        import torch

        return torch.cuda.get_device_name(torch.cuda.current_device())

    def deactivate(self) -> None:
        for attr in ("context", "engine", "runtime", "inputs", "outputs"):
            if hasattr(self, attr):
                delattr(self, attr)
        self.active = False
