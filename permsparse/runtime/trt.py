"""Build TensorRT / TensorRT-RTX engines with 2:4 sparse weights, and report where sparsity took effect.

One code path serves datacenter TensorRT (8/10/11, ``import tensorrt``; preferred when installed) and TensorRT-RTX
(``import tensorrt_rtx``). Precision: builders that still have ``BuilderFlag.FP16`` (TensorRT 8/10) get the flag on
the fp32 network; strongly typed builders (TensorRT 11, TensorRT-RTX) get an fp16/bf16 ONNX converted by
:mod:`permsparse.runtime.precision`.

Sparsity report: datacenter TensorRT logs ``(Sparsity) Layers eligible for sparse math: ...`` and ``(Sparsity) TRT
inference plan picked sparse implementation for layers: ...`` at build time; each prunable ONNX MatMul/Gemm is
matched against these lists and the engine's per-layer tactic names. TensorRT-RTX picks GEMM kernels just in time
on the GPU, so a CPU build can only say whether each layer is a sparse candidate (2:4 weights, ≥ 256 channels).
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from permsparse.errors import PermsparseError
from permsparse.ir.inputs import graph_inputs
from permsparse.ir.model import load_model
from permsparse.ir.save import atomic_write_bytes
from permsparse.ir.shapes import ShapeSpec, derive_profiles, format_profiles
from permsparse.ir.weights import MIN_SPARSE_CHANNELS, model_weight_status
from permsparse.runtime.choices import PRECISIONS
from permsparse.runtime.precision import convert_precision, model_float_type
from permsparse.runtime.sparsity import (
    BuildReport,
    classify_layers,
    parse_sparsity_log,
    sparse_tactic_layers,
)

logger = logging.getLogger(__name__)

TRT_MODULES: tuple[str, ...] = ("tensorrt", "tensorrt_rtx")
NO_TENSORRT_MESSAGE = (
    "neither `tensorrt` nor `tensorrt_rtx` is installed. Install TensorRT-RTX from PyPI "
    "(`pip install 'permsparse[trt]'`, builds on any machine, engines for Ampere-and-newer RTX-class GPUs) or "
    "datacenter TensorRT from NVIDIA (`pip install tensorrt` where NVIDIA's index is reachable)"
)


def import_tensorrt(preferred: str | None = None) -> ModuleType:
    """Import and return ``tensorrt`` (preferred) or ``tensorrt_rtx``; :class:`PermsparseError` if neither imports."""
    names = (preferred,) if preferred else TRT_MODULES
    errors = []
    for name in names:
        try:
            mod = importlib.import_module(name)
            # The PyPI `tensorrt` stub imports but has no Builder.
            if not hasattr(mod, "Builder"):
                errors.append(f"{name}: no Builder (a stub package?)")
                continue
            return mod
        except Exception as exc:  # ImportError, or OSError from missing shared libraries
            errors.append(f"{name}: {exc}")
    logger.debug("TensorRT import failures: %s", "; ".join(errors))
    if preferred:
        raise PermsparseError(f"cannot import `{preferred}` ({'; '.join(errors)})")
    raise PermsparseError(NO_TENSORRT_MESSAGE)


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
        return True
    except PermsparseError:
        return False


def trt_version(trt: ModuleType) -> str:
    return f"{trt.__name__} {getattr(trt, '__version__', '?')}"


def strongly_typed_only(trt: ModuleType) -> bool:
    """True for builders without precision flags (TensorRT 11, TensorRT-RTX)."""
    return not hasattr(trt.BuilderFlag, "FP16")


@dataclass(frozen=True)
class BuildConfig:
    """Options of :func:`build_engine`; None means the default.

    Attributes:
        precision: "fp32" (default: as the ONNX is), "fp16" or "bf16".
        sparse: set ``BuilderFlag.SPARSE_WEIGHTS`` (default True).
        shapes: user shapes per input (see :mod:`permsparse.runtime.shapes`); others derived from dynamic axes.
        workspace_gb: workspace memory pool limit in GiB (default: TensorRT's).
        timing_cache: file to read (if present) and update with the timing cache (a no-op in TensorRT-RTX).
        keep_fp32_ops: op types kept in fp32 by the precision conversion (default ``DEFAULT_KEEP_FP32_OPS``).
        module: "tensorrt" or "tensorrt_rtx" to force one (default: tensorrt if installed, else tensorrt_rtx).
        precision_mode: "auto" (flags where the builder has them, else ONNX conversion), "flags" or "onnx".
        log_path: write TensorRT's full verbose log there.
        min_channels: channel count below which the report expects dense kernels (default 256).
    """

    precision: str | None = None
    sparse: bool | None = None
    shapes: Mapping[str, ShapeSpec] | None = None
    workspace_gb: float | None = None
    timing_cache: str | os.PathLike[str] | None = None
    keep_fp32_ops: tuple[str, ...] | None = None
    module: str | None = None
    precision_mode: str | None = None
    log_path: str | os.PathLike[str] | None = None
    min_channels: int | None = None


def _make_logger(trt: ModuleType, log_file: Any | None) -> Any:
    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.sparsity: list[str] = []
            self.layer_lines: list[str] = []
            self.problems: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if log_file is not None:
                log_file.write(f"[{getattr(severity, 'name', severity)}] {msg}\n")
            if "(Sparsity)" in msg:
                self.sparsity.append(msg)
            if "TacticName:" in msg:
                self.layer_lines.extend(line for line in msg.splitlines() if "TacticName:" in line)
            sev = int(severity)
            if sev <= int(trt.ILogger.Severity.ERROR):
                self.problems.append(msg)
                logger.debug("TensorRT error: %s", msg)
            elif sev == int(trt.ILogger.Severity.WARNING):
                logger.debug("TensorRT warning: %s", msg)

    return _Logger()


def build_engine(
    onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str], config: BuildConfig | None = None
) -> BuildReport:
    """Parse ``onnx_path``, build a (sparse) engine, write it atomically to ``out_path`` and report sparsity."""
    config = config or BuildConfig()
    onnx_path = Path(onnx_path)
    model = load_model(onnx_path)
    out_path = Path(out_path)
    from permsparse.ir.model import model_files

    if out_path.resolve() in model_files(onnx_path, model):
        raise PermsparseError(f"{out_path}: the engine would overwrite the ONNX model or its data; choose another -o")
    precision = config.precision or "fp32"
    if precision not in PRECISIONS:
        raise PermsparseError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    sparse = True if config.sparse is None else config.sparse
    min_channels = config.min_channels or MIN_SPARSE_CHANNELS
    trt = import_tensorrt(config.module)
    profiles = derive_profiles(graph_inputs(model), config.shapes)
    notes: list[str] = []

    mode = config.precision_mode or "auto"
    if mode not in ("auto", "flags", "onnx"):
        raise PermsparseError(f"precision mode '{mode}': choose auto, flags or onnx")
    has_flags = not strongly_typed_only(trt)
    if mode == "auto":
        mode = "flags" if has_flags else "onnx"
    if mode == "flags" and not has_flags:
        raise PermsparseError(f"{trt_version(trt)} is strongly typed and has no precision flags; use precision mode onnx")
    if mode == "flags" and precision == "bf16" and not hasattr(trt.BuilderFlag, "BF16"):
        raise PermsparseError(f"{trt_version(trt)} has no BF16 builder flag; use --precision fp16 or a newer TensorRT")
    if precision == "fp32":
        mode = "native"
        current = model_float_type(model)
        if current != "fp32":
            precision, mode = current, "native"

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="permsparse-build-") as tmp:
        parse_path = onnx_path
        if mode == "onnx":
            parse_path = Path(tmp) / f"{onnx_path.stem}.{precision}.onnx"
            logger.info("converting %s to %s for the strongly typed builder", onnx_path.name, precision)
            convert_precision(onnx_path, parse_path, precision, keep_fp32_ops=config.keep_fp32_ops)
        log_file = open(config.log_path, "w", encoding="utf-8") if config.log_path else None
        try:
            serialized, trt_logger, cache_bytes = _build(
                trt, parse_path, precision, mode, sparse, profiles, config, log_file
            )
        finally:
            if log_file is not None:
                log_file.close()
    build_seconds = time.perf_counter() - t0
    data = bytes(serialized)
    atomic_write_bytes(out_path, data)
    if config.timing_cache and cache_bytes:
        atomic_write_bytes(config.timing_cache, cache_bytes)
    logger.info("wrote %s (%d bytes) in %.1f s", out_path, len(data), build_seconds)

    eligible, picked = parse_sparsity_log(trt_logger.sparsity)
    tactic_sparse = sparse_tactic_layers(trt_logger.layer_lines)
    if not tactic_sparse and trt_logger.layer_lines is not None:
        tactic_sparse |= _inspect_engine(trt, data, trt_logger)
    weights = model_weight_status(model, onnx_path.parent)
    layers = classify_layers(weights, eligible, picked, tactic_sparse, sparse, min_channels)
    if trt.__name__ == "tensorrt_rtx" and picked is None:
        notes.append(
            "TensorRT-RTX selects GEMM kernels just in time on the GPU: whether a candidate runs sparse is decided "
            "there, not in this build"
        )
    if sparse and not any(w.nm_valid for w in weights):
        notes.append("no weight is 2:4 along K: run `permsparse optimize` first, or check with `permsparse inspect`")
    if config.timing_cache and trt.__name__ == "tensorrt_rtx":
        notes.append("timing caches are a no-op in TensorRT-RTX")
    return BuildReport(
        engine_path=out_path,
        module=trt_version(trt),
        precision=precision,
        precision_mode={"flags": "builder flag", "onnx": "ONNX conversion", "native": "as stored"}[mode],
        sparse_flag=sparse,
        profiles=tuple(profiles.values()),
        build_seconds=build_seconds,
        engine_bytes=len(data),
        layers=layers,
        eligible=eligible,
        picked=picked,
        notes=tuple(notes),
    )


def _build(
    trt: ModuleType,
    parse_path: Path,
    precision: str,
    mode: str,
    sparse: bool,
    profiles: Mapping[str, ShapeSpec],
    config: BuildConfig,
    log_file: Any | None,
) -> tuple[Any, Any, bytes | None]:
    trt_logger = _make_logger(trt, log_file)
    builder = trt.Builder(trt_logger)
    flags = 0
    net_flags = trt.NetworkDefinitionCreationFlag
    if hasattr(net_flags, "EXPLICIT_BATCH") and getattr(trt, "__version__", "0").split(".")[0] in ("7", "8"):
        flags |= 1 << int(net_flags.EXPLICIT_BATCH)
    if mode == "onnx" and hasattr(net_flags, "STRONGLY_TYPED"):
        flags |= 1 << int(net_flags.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(parse_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise PermsparseError(
            f"{trt_version(trt)} could not parse the ONNX model:\n  " + "\n  ".join(errors or trt_logger.problems)
        )
    bcfg = builder.create_builder_config()
    if sparse:
        bcfg.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if mode == "flags" and precision == "fp16":
        bcfg.set_flag(trt.BuilderFlag.FP16)
    elif mode == "flags" and precision == "bf16":
        bcfg.set_flag(trt.BuilderFlag.BF16)
    if config.workspace_gb is not None:
        if config.workspace_gb <= 0:
            raise PermsparseError("--workspace must be a positive number of GiB")
        bcfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * 2**30))
    if hasattr(trt, "ProfilingVerbosity"):
        bcfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache = None
    if config.timing_cache:
        blob = b""
        cache_path = Path(config.timing_cache)
        if cache_path.is_file():
            blob = cache_path.read_bytes()
        cache = bcfg.create_timing_cache(blob)
        bcfg.set_timing_cache(cache, False)
    _add_profile(trt, builder, network, bcfg, profiles)
    serialized = builder.build_serialized_network(network, bcfg)
    if serialized is None:
        raise PermsparseError(
            f"{trt_version(trt)} failed to build the engine:\n  " + "\n  ".join(trt_logger.problems[-10:] or ["(no error logged)"])
        )
    cache_bytes = None
    if cache is not None:
        try:
            cache_bytes = bytes(bcfg.get_timing_cache().serialize())
        except Exception as exc:  # pragma: no cover - depends on the TensorRT build
            logger.info("could not serialize the timing cache: %s", exc)
    return serialized, trt_logger, cache_bytes


def _add_profile(trt: ModuleType, builder: Any, network: Any, bcfg: Any, profiles: Mapping[str, ShapeSpec]) -> None:
    dynamic = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if all(d >= 0 for d in shape):
            continue
        spec = profiles.get(tensor.name)
        if spec is None:
            raise PermsparseError(f"input '{tensor.name}' is dynamic {shape}; give --shapes {tensor.name}:MIN,OPT,MAX")
        if len(spec.min) != len(shape):
            raise PermsparseError(f"--shapes {tensor.name}: rank {len(spec.min)}, TensorRT sees rank {len(shape)}")
        dynamic.append((tensor.name, spec))
    if not dynamic:
        return
    profile = builder.create_optimization_profile()
    for name, spec in dynamic:
        profile.set_shape(name, spec.min, spec.opt, spec.max)
    bcfg.add_optimization_profile(profile)
    logger.info("optimization profile: %s", format_profiles(dict(dynamic)))


def _inspect_engine(trt: ModuleType, data: bytes, trt_logger: Any) -> set[str]:
    """Sparse layers from the engine inspector (needs a GPU to deserialize; empty set otherwise)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return set()
        runtime = trt.Runtime(trt_logger)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            return set()
        inspector = engine.create_engine_inspector()
        info = inspector.get_engine_information(trt.LayerInformationFormat.ONELINE)
        return sparse_tactic_layers(info.splitlines())
    except Exception as exc:  # inspection is best effort
        logger.debug("engine inspection failed: %s", exc)
        return set()
