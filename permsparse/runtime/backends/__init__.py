"""Bench backends: one :class:`~permsparse.runtime.backends.base.Runner` subclass per module, registered by name.

``ort`` (onnxruntime CPU), ``torch`` (the project's torch evaluator with 2:4 kernels), ``tensorrt`` (engines).
Importing this package registers them (their heavy imports happen in ``activate``); :func:`backend_names` is the
one list of names. A new backend: add ``backends/<name>.py`` with a ``@register_backend("<name>")`` runner and import
it below.
"""

from permsparse.devices import DEVICES
from permsparse.runtime.backends.base import (
    BenchConfig,
    Runner,
    backend_names,
    get_backend,
    register_backend,
    require_cuda,
)
from permsparse.runtime.backends import ort, torch, tensorrt  # noqa: E402,F401  (registers, in this order)

__all__ = ["DEVICES", "BenchConfig", "Runner", "backend_names", "get_backend", "register_backend", "require_cuda"]
