"""permsparse: 2:4 sparsity for ONNX Transformers with learned channel permutations folded into the weights.

Public API (lazy: nothing heavy is imported until a verb runs)::

    import permsparse
    result = permsparse.optimize("model.onnx", "model.sparse.onnx", permsparse.OptimizeConfig(importance="wanda"))
    report = permsparse.inspect("model.sparse.onnx")

Verbs: :func:`optimize`, :func:`replay` (a recipe), :func:`recover`, :func:`inspect`, :func:`build`, :func:`bench`,
:func:`export`; configs: :class:`OptimizeConfig`, :class:`RecoverConfig`, :class:`InspectConfig`, :class:`BuildConfig`,
:class:`BenchConfig`, :class:`ExportConfig`;
values: :class:`NMPattern`, :class:`ShapeSpec`; errors: :class:`PermsparseError` and its subclasses.
"""

from __future__ import annotations

import os
from typing import Any

from permsparse.errors import (
    Interrupted,
    PermsparseError,
    UsageError,
    VerificationError,
)

__version__ = "0.2.0"

# onnxruntime's telemetry writes a ".ses" session file into $TMPDIR on every run and never removes it; it reads this
# variable once, when onnxruntime is imported (worker processes inherit it). A user's own setting is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

_LAZY = {
    "optimize": "permsparse.api",
    "inspect": "permsparse.api",
    "build": "permsparse.api",
    "bench": "permsparse.api",
    "export": "permsparse.api",
    "replay": "permsparse.api",
    "recover": "permsparse.api",
    "RecoverConfig": "permsparse.recover.config",
    "ExportConfig": "permsparse.api",
    "OptimizeConfig": "permsparse.pipeline.config",
    "ResolvedConfig": "permsparse.pipeline.config",
    "InspectConfig": "permsparse.inspection",
    "BuildConfig": "permsparse.runtime.trt",
    "BenchConfig": "permsparse.runtime.bench",
    "NMPattern": "permsparse.pattern",
    "ShapeSpec": "permsparse.ir.shapes",
    "OptimizeResult": "permsparse.pipeline.run",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'permsparse' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["__version__", "PermsparseError", "UsageError", "VerificationError", "Interrupted", *_LAZY]
