"""Shared fixtures: models exported once per session with both torch exporters."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

MODELS = ("minilm", "vit", "llama")
EXPORTERS = ("dynamo", "legacy")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(name, exporter) -> Path`` of a tiny (or real, for MiniLM) model, exported once per session."""
    cache: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("models")

    def get(name: str, exporter: str) -> Path:
        key = (name, exporter)
        if key not in cache:
            from permsparse.models import export_model

            cache[key] = export_model(name, root / f"{name}_{exporter}.onnx", exporter=exporter, size="tiny")
        return cache[key]

    return get


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pytest_sessionfinish(session, exitstatus):  # diagnosis: was SIGINT ignored in this process by the end?
    import signal

    print(f"\n[conftest] SIGINT disposition at the end of the session: {signal.getsignal(signal.SIGINT)!r}")
