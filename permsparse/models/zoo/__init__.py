"""The models ``permsparse export`` offers, one module per family, each registering itself in
:data:`permsparse.models.registry.MODEL_FAMILIES`; imported here explicitly, in the order the CLI lists them.
Nothing here imports torch: each family's loader imports its model code when it runs. :func:`export_model` is the
``export`` verb's dispatch: the family's loader, then :func:`permsparse.models.export.export_onnx`."""

from __future__ import annotations

import os
from pathlib import Path

from permsparse.errors import PermsparseError
from permsparse.models.registry import (
    EXPORTERS,
    MODEL_FAMILIES,
    ExportRequest,
    model_family,
    model_sizes,
)

# The order of these imports is the order the CLI lists the families.
# isort: off
from permsparse.models.zoo import minilm, smollm2, vit, llama, hf, families  # noqa: F401  (each registers)
# isort: on

def export_model(
    name: str,
    path: str | os.PathLike[str],
    *,
    exporter: str = "dynamo",
    size: str = "tiny",
    seed: int = 0,
    hf_dir: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Build or load model ``name`` (a family of :data:`~permsparse.models.registry.MODEL_FAMILIES`: ``minilm``,
    ``smollm2``, ``vit``, ``llama``, ``hf``) and export it to ``path``.

    ``size`` picks a preset for ``vit`` (tiny, small, b16) and ``llama`` (tiny, small, 1b); ``seed`` seeds the
    built-in models' weights; ``hf_dir`` is the checkpoint directory for ``hf`` (its tokenizer is written beside
    the ONNX file); ``dtype`` (``float32``, ``float16``, ``bfloat16``) is the weights' type for ``hf``/``smollm2``.
    """
    if exporter not in EXPORTERS:
        raise PermsparseError(f"unknown exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    family = model_family(name)
    if dtype != "float32" and not family.dtypes:
        takes = "/".join(sorted(n for n, f in MODEL_FAMILIES.items() if f.dtypes))
        raise PermsparseError(f"dtype {dtype} applies to {takes} checkpoints; the built-in models export in float32")
    request = ExportRequest(size=size, seed=seed, hf_dir=None if hf_dir is None else str(hf_dir), dtype=dtype)
    loaded = family.load(request)
    from permsparse.models.export import export_onnx

    out = export_onnx(loaded.module, loaded.example_inputs, path, dynamo=exporter == "dynamo",
                      dynamic_axes=loaded.dynamic_axes, output_names=loaded.output_names)
    if family.tokenizer is not None:
        from permsparse.models.hf import save_tokenizer_beside

        save_tokenizer_beside(family.tokenizer(request), out)
    return out


__all__ = ["EXPORTERS", "MODEL_FAMILIES", "export_model", "model_family", "model_sizes"]
