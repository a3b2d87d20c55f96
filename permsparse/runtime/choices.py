"""Names the runtime verbs (``build``, ``bench``, ``export --dtype``) accept; a leaf module, so the CLI can offer them
without importing onnx, torch or TensorRT."""

from __future__ import annotations

#: Engine / model precisions (``build --precision``, ``bench --precision``).
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
#: How a precision is applied: builder flags, a converted ONNX, or chosen from the model (``auto``).
PRECISION_MODES: tuple[str, ...] = ("auto", "flags", "onnx")
#: The torch backend's 2:4 kernels.
SPARSE_METHODS: tuple[str, ...] = ("semi", "cutlass", "cusparselt", "cslt")

__all__ = ["PRECISIONS", "PRECISION_MODES", "SPARSE_METHODS"]
