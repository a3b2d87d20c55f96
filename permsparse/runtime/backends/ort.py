"""``ort``: onnxruntime's CPU provider (correctness and users without a GPU; no 2:4 kernels, so expect ≈1.0×)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from permsparse.errors import PermsparseError
from permsparse.runtime.backends.base import Runner, register_backend


@register_backend("ort", "onnxruntime CPU (default; no 2:4 kernels, so ≈1.0×: a drift and sanity check)")
class OrtRunner(Runner):
    """onnxruntime CPU session with graph optimizations on."""

    note = "onnxruntime CPU has no 2:4 kernels: expect ≈1.0×; the output check is dense vs sparse drift"

    def activate(self) -> None:
        if self.active:
            return
        from permsparse.ir.session import Session

        self.session: Any = Session(self.path, threads=self.config.threads, optimize=True)
        self.active = True

    def _feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.session.input_names) - set(feeds)
        if missing:
            raise PermsparseError(
                f"{self.path}: inputs {sorted(missing)} differ from the other model's; bench needs the same inputs"
            )
        return {k: v for k, v in feeds.items() if k in self.session.input_names}

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.activate()
        return dict(self.session.run(self._feeds(feeds)))

    def bind(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        self.activate()
        raw, f = self.session.session, self._feeds(feeds)
        return lambda: raw.run(None, f)

    def deactivate(self) -> None:
        self.session = None
        self.active = False
