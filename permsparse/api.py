"""The public Python API: one function per verb, each taking a frozen config (``None`` fields mean the default).

    import permsparse
    result = permsparse.optimize("model.onnx", "model.sparse.onnx", permsparse.OptimizeConfig(importance="wanda"))
    print(result.equivalence.max_rel_error, sum(result.nm_valid.values()))
    info = permsparse.inspect("model.sparse.onnx")
    print(info.n_valid, "of", len(info.weights), "weights are 2:4")

The command line (:mod:`permsparse.cli`) is a thin layer over these functions. Heavy packages (torch, onnxruntime,
tensorrt) are imported only when a function runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from permsparse.config import OptimizeConfig
from permsparse.inspection import InspectConfig

if TYPE_CHECKING:
    from permsparse.inspection import InspectResult
    from permsparse.pipeline import OptimizeResult
    from permsparse.recover import RecoverConfig, RecoverResult
    from permsparse.runtime.bench import BenchConfig, BenchResult
    from permsparse.runtime.trt import BuildConfig, BuildReport

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ExportConfig:
    """Settings of ``permsparse export``; ``None`` means the default (dynamo exporter, tiny preset, seed 0)."""

    exporter: str | None = None
    size: str | None = None
    seed: int | None = None
    hf_dir: str | None = None
    dtype: str | None = None


def optimize(model: PathLike, output: PathLike | None, config: OptimizeConfig | None = None) -> OptimizeResult:
    """Analyze, calibrate, learn permutations, fold, mask, verify and write ``output`` (see :mod:`permsparse.pipeline`)."""
    from permsparse.data.kinds import model_file
    from permsparse.pipeline import optimize as run

    return run(model_file(model), output, config)  # an export folder: its model.onnx (tokenizer beside it)


def inspect(model: PathLike, config: InspectConfig | None = None) -> InspectResult:
    """Weights, closures, fold status and N:M validity of every weight of ``model`` (read-only)."""
    from permsparse.data.kinds import model_file
    from permsparse.inspection import inspect_model

    return inspect_model(model_file(model), config)


def build(model: PathLike, engine: PathLike, config: BuildConfig | None = None) -> BuildReport:
    """A TensorRT / TensorRT-RTX engine with sparse weights, and which layers can run sparse."""
    from permsparse.runtime.trt import build_engine

    return build_engine(model, engine, config)


def bench(sparse: PathLike, dense: PathLike, config: BenchConfig | None = None) -> BenchResult:
    """Latency of ``sparse`` vs ``dense`` on onnxruntime, torch (GPU) or TensorRT (GPU)."""
    from permsparse.runtime.bench import run_bench

    return run_bench(sparse, dense, config)


def recover(sparse: PathLike, dense: PathLike, output: PathLike, config: RecoverConfig | None = None) -> RecoverResult:
    """Distil the sparse model from its dense teacher with the masks frozen and write ``output``
    (see :mod:`permsparse.recover`)."""
    from permsparse.recover import recover as run

    return run(sparse, dense, output, config)


def export(name: str, output: PathLike, config: ExportConfig | None = None) -> Path:
    """Export a built-in model (``minilm`` real weights, seeded ``vit``/``llama``) or a local HF checkpoint (``hf``)."""
    from permsparse.models.export import export_model

    cfg = config or ExportConfig()
    return export_model(name, output, exporter=cfg.exporter or "dynamo", size=cfg.size or "tiny",
                        seed=cfg.seed or 0, hf_dir=cfg.hf_dir, dtype=cfg.dtype or "float32")
