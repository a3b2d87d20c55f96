"""The model families of ``permsparse export``: a registry that the CLI choices (``model``, ``--size``) and
:func:`permsparse.models.zoo.export_model` read.

:data:`MODEL_FAMILIES` maps each family name to a :class:`ModelFamily`, filled by the :func:`register` decorator in
the family's own module under :mod:`permsparse.models.zoo` (imported explicitly there, in the order the CLI lists
them). Registration loads no torch: a family's ``load`` imports its model code when it runs.

Adding a family: one module in ``permsparse/models/zoo/`` with a ``@register(...)`` loader, its name in the import
line of ``zoo/__init__.py``, and a test.

Invariant: every registered family loads into a :class:`permsparse.models.hf.LoadedModel` that
:func:`~permsparse.models.export.export_onnx` exports, and only families registered with ``dtypes=True`` are asked
for weights in another dtype than float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from permsparse.errors import PermsparseError

if TYPE_CHECKING:
    from permsparse.models.hf import LoadedModel

#: The torch exporters (``dynamo=True``: torch.export + onnxscript; ``dynamo=False``: the TorchScript tracer).
EXPORTERS: tuple[str, ...] = ("dynamo", "legacy")


@dataclass(frozen=True)
class ExportRequest:
    """What ``permsparse export`` asks of a family: ``size`` preset, weight ``seed``, checkpoint folder, weight dtype."""

    size: str = "tiny"
    seed: int = 0
    hf_dir: str | None = None
    dtype: str = "float32"


@dataclass(frozen=True)
class ModelFamily:
    """A registered family: ``load(request)`` builds or loads the module; ``sizes`` its ``--size`` presets (empty:
    sizes do not apply); ``dtypes``: it loads real checkpoint weights and honours ``--dtype``; ``tokenizer(request)``:
    the folder whose tokenizer is written beside the ONNX file (None: no tokenizer)."""

    name: str
    load: Callable[[ExportRequest], LoadedModel]
    sizes: tuple[str, ...] = ()
    dtypes: bool = False
    tokenizer: Callable[[ExportRequest], str] | None = None
    summary: str = ""


MODEL_FAMILIES: dict[str, ModelFamily] = {}
"""The registry: family name -> :class:`ModelFamily` (insertion order is the order the CLI lists)."""


def register(name: str, *, sizes: tuple[str, ...] = (), dtypes: bool = False,
             tokenizer: Callable[[ExportRequest], str] | None = None, summary: str = ""
             ) -> Callable[[Callable[[ExportRequest], LoadedModel]], Callable[[ExportRequest], LoadedModel]]:
    """Decorator: register ``load(request) -> LoadedModel`` as model family ``name`` (twice is an error)."""

    def add(load: Callable[[ExportRequest], LoadedModel]) -> Callable[[ExportRequest], LoadedModel]:
        if name in MODEL_FAMILIES:
            raise ValueError(f"model family {name!r} is registered twice")
        MODEL_FAMILIES[name] = ModelFamily(name, load, tuple(sizes), dtypes, tokenizer, summary)
        return load

    return add


def model_family(name: str) -> ModelFamily:
    """The registered family ``name``; :class:`PermsparseError` listing the registered names otherwise."""
    try:
        return MODEL_FAMILIES[name]
    except KeyError:
        raise PermsparseError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_FAMILIES)}") from None


def model_sizes() -> tuple[str, ...]:
    """Every ``--size`` preset of the registered families, each once, in registration order."""
    return tuple(dict.fromkeys(s for fam in MODEL_FAMILIES.values() for s in fam.sizes))
