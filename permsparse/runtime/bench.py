"""``permsparse bench``: dense vs sparse latency with one of three backends, as a table and a bar plot.

- ``ort``: both ONNX models on onnxruntime's CPU provider (correctness and no-GPU users);
- ``tensorrt``: both models built into engines (or given as ``.plan``) and run with ``execute_async_v3`` on torch
  CUDA buffers (GPU only);
- ``torch``: the models' prunable MatMuls at their real token counts, dense ``F.linear`` vs 2:4 semi-structured,
  summed into a linear-layer speed-up (GPU only; fp16/bf16).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from permsparse.config import BACKENDS
from permsparse.errors import PermsparseError
from permsparse.ir.compare import agreement
from permsparse.ir.inputs import InputSpec, graph_inputs, random_feeds
from permsparse.ir.model import load_model
from permsparse.ir.save import atomic_write_bytes, atomic_write_text
from permsparse.ir.session import Session
from permsparse.ir.shapes import ShapeSpec, derive_profiles
from permsparse.runtime.timing import TimingStats, auto_inner, time_callable

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class BenchConfig:
    """Options of :func:`run_bench`; None means the default.

    Attributes:
        backend: "ort" (default), "torch" or "tensorrt".
        shapes: input shapes; the ``opt`` shape is timed (and min/max shape the TensorRT profile).
        iters: timed samples (default 50); warmup: untimed calls first (default 10).
        precision: torch: "fp16" (default) or "bf16"; tensorrt: "fp16" (default), "bf16" or "fp32"; ort: as stored.
        sparse_method: torch backend: "semi" (default), "cutlass", "cusparselt" or "cslt".
        threads: onnxruntime intra-op threads (default: onnxruntime's).
        seed: random inputs' seed (default 0).
        plot_path: where to write the PNG (default: none).
        workspace_gb: TensorRT workspace for engines built on the fly.
    """

    backend: str | None = None
    shapes: Mapping[str, ShapeSpec] | None = None
    iters: int | None = None
    warmup: int | None = None
    precision: str | None = None
    sparse_method: str | None = None
    threads: int | None = None
    seed: int | None = None
    plot_path: str | os.PathLike[str] | None = None
    workspace_gb: float | None = None


@dataclass(frozen=True)
class BenchRow:
    label: str
    dense: TimingStats
    sparse: TimingStats
    count: int = 1

    @property
    def speedup(self) -> float:
        return self.dense.median_ms / self.sparse.median_ms if self.sparse.median_ms > 0 else float("nan")


@dataclass(frozen=True)
class BenchResult:
    backend: str
    device: str
    precision: str
    shapes: tuple[ShapeSpec, ...]
    rows: tuple[BenchRow, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    correctness: Mapping[str, float] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def total(self) -> BenchRow:
        """The last row is the model (or all-linear-layers) total."""
        return self.rows[-1]

    def table(self) -> str:
        return format_table(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"] = [str(s) for s in self.shapes]
        for row, r in zip(d["rows"], self.rows):
            row["speedup"] = r.speedup
        return d


def format_table(result: BenchResult) -> str:
    """One plain-text (Markdown-compatible) table: dense ms, sparse ms (median / p90), speed-up."""
    head = f"backend: {result.backend} on {result.device}, {result.precision}"
    if result.shapes:
        head += ", shapes " + " ".join(str(s.name) + ":" + "x".join(map(str, s.opt)) for s in result.shapes)
    rows = [("case", "dense ms (med / p90)", "sparse ms (med / p90)", "speed-up")]
    for r in result.rows:
        label = r.label + (f" ×{r.count}" if r.count > 1 else "")
        rows.append(
            (
                label,
                f"{r.dense.median_ms:.3f} / {r.dense.p90_ms:.3f}",
                f"{r.sparse.median_ms:.3f} / {r.sparse.p90_ms:.3f}",
                f"{r.speedup:.2f}×",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [head, ""]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.extend(f"note: {n}" for n in result.notes)
    if result.correctness:
        lines.append("check: " + ", ".join(f"{k}={v:.4g}" for k, v in result.correctness.items()))
    return "\n".join(lines)


def plot_result(result: BenchResult, path: str | os.PathLike[str]) -> Path:
    """Grouped bars (dense vs sparse median, whiskers to p90) with the speed-up over each group; PNG via Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.rows
    fig = Figure(figsize=(max(5.0, 1.4 * len(rows) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(rows))
    w = 0.38
    dm = [r.dense.median_ms for r in rows]
    sm = [r.sparse.median_ms for r in rows]
    derr = [[0.0] * len(rows), [max(0.0, r.dense.p90_ms - r.dense.median_ms) for r in rows]]
    serr = [[0.0] * len(rows), [max(0.0, r.sparse.p90_ms - r.sparse.median_ms) for r in rows]]
    ax.bar(x - w / 2, dm, w, yerr=derr, label="dense", color="#8c8c8c", capsize=3)
    ax.bar(x + w / 2, sm, w, yerr=serr, label="2:4 sparse", color="#2a7ab9", capsize=3)
    for xi, r in zip(x, rows):
        top = max(r.dense.p90_ms, r.sparse.p90_ms)
        ax.annotate(f"{r.speedup:.2f}×", (xi, top), ha="center", va="bottom", fontsize=9,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(x)
    ax.set_xticklabels([r.label[:28] for r in rows], rotation=20 if len(rows) > 3 else 0, ha="right" if len(rows) > 3 else "center", fontsize=8)
    ax.set_ylabel("latency, ms (median; whisker = p90)")
    ax.set_title(f"{result.backend} on {result.device}, {result.precision}", fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent if path.parent.exists() else None)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        atomic_write_bytes(path, Path(tmp).read_bytes())
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _opt_shapes(path: Path, config: BenchConfig) -> tuple[onnx.ModelProto, list[InputSpec], dict[str, ShapeSpec]]:
    model = load_model(path, check=False)
    inputs = graph_inputs(model)
    return model, inputs, derive_profiles(inputs, config.shapes)


# --------------------------------------------------------------------------------------------------- ort backend


def _bench_ort(sparse_path: Path, dense_path: Path, config: BenchConfig, iters: int, warmup: int) -> BenchResult:
    model, inputs, profiles = _opt_shapes(sparse_path, config)
    feeds = random_feeds(model, {k: v.opt for k, v in profiles.items()}, seed=config.seed or 0)
    rows, outs = [], {}
    stats = {}
    for tag, path in (("dense", dense_path), ("sparse", sparse_path)):
        sess = Session(path, threads=config.threads, optimize=True)
        missing = set(sess.input_names) - set(feeds)
        if missing:
            raise PermsparseError(f"{path}: inputs {sorted(missing)} differ from the sparse model's; bench needs the same inputs")
        f = {k: v for k, v in feeds.items() if k in sess.input_names}
        outs[tag] = list(sess.run(f).values())
        raw = sess.session
        stats[tag] = time_callable(lambda s=raw, f=f: s.run(None, f), iters=iters, warmup=warmup)
    rows.append(BenchRow(sparse_path.stem, stats["dense"], stats["sparse"]))
    check = agreement(outs["dense"], outs["sparse"])
    notes = ["onnxruntime CPU has no 2:4 kernels: expect ≈1.0×; the output check is dense vs sparse drift"]
    return BenchResult("ort", _cpu_name(), "as stored", tuple(profiles.values()), tuple(rows), tuple(notes),
                       {"dense_vs_sparse_" + k: v for k, v in check.items()})


def _cpu_name() -> str:
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# --------------------------------------------------------------------------------------------------- torch backend


def _require_cuda(backend: str) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise PermsparseError(f"the {backend} backend needs torch with CUDA") from exc
    if not torch.cuda.is_available():
        raise PermsparseError(
            f"the {backend} backend needs a CUDA GPU and torch.cuda.is_available() is False; "
            "use --backend ort on a machine without a GPU"
        )
    return torch


def _bench_torch(sparse_path: Path, dense_path: Path, config: BenchConfig, iters: int, warmup: int) -> BenchResult:
    _require_cuda("torch")
    from permsparse.ir.graph import const_index, import_graph
    from permsparse.ir.weights import find_weights, weight_status
    from permsparse.passes.shapes import token_counts
    from permsparse.runtime.torch_sparse import LinearShape, env_info, time_linear

    precision = config.precision or "fp16"
    if precision not in ("fp16", "bf16"):
        raise PermsparseError("the torch backend times fp16 or bf16 (2:4 kernels have no fp32 path); use --precision fp16")
    method = config.sparse_method or "semi"
    model, inputs, profiles = _opt_shapes(sparse_path, config)
    tokens = token_counts(model, {k: v.opt for k, v in profiles.items()})
    dense_graph = import_graph(load_model(dense_path, check=False), dense_path.parent)
    dense_shapes = Counter((w.k, w.n) for w in find_weights(dense_graph))
    graph = import_graph(model, sparse_path.parent)
    consts = const_index(graph)
    groups: dict[tuple[int, int, int, bool], list[np.ndarray]] = {}
    counts: Counter[tuple[int, int, int, bool]] = Counter()
    notes: list[str] = []
    unknown = 0
    for info in find_weights(graph):
        t = tokens.get(info.input)
        if t is None:
            unknown += 1
            continue
        stored = consts[info.const].values
        key = (t, info.k, info.n, weight_status(info, stored).nm_valid)
        counts[key] += 1
        if key not in groups:
            groups[key] = [np.ascontiguousarray(info.k_major(np.asarray(stored, dtype=np.float32)))]
    if unknown:
        notes.append(f"{unknown} MatMul(s) skipped: their token count could not be inferred at these shapes")
    if not counts:
        raise PermsparseError(f"{sparse_path}: no MatMul/Gemm with a constant weight and a known token count")
    sparse_shapes = Counter((k, n) for (_, k, n, _), c in counts.items() for _ in range(c))
    if sparse_shapes != dense_shapes:
        notes.append("the dense model's weight shapes differ from the sparse model's; timing the sparse model's shapes")
    rows: list[BenchRow] = []
    total_d = total_s = None
    worst = 0.0
    for (t, k, n, ok24), c in sorted(counts.items()):
        w_kn = groups[(t, k, n, ok24)][0]
        shape = LinearShape(t, k, n, c)
        timing = time_linear(shape, precision, (method,) if ok24 else (), weight_nk=w_kn.T, iters=iters, warmup=warmup,
                             seed=config.seed or 0)
        sp = timing.sparse.get(method)
        if not ok24:
            notes.append(f"{k}x{n} ×{c}: weights not 2:4, counted dense in both columns")
            sp = timing.dense
        elif sp is None:
            notes.append(f"{k}x{n} ×{c} at {t} tokens: {method} failed ({timing.errors.get(method)}); counted dense")
            sp = timing.dense
        else:
            worst = max(worst, timing.rel_error.get(method, 0.0))
        rows.append(BenchRow(f"{t}tok {k}x{n}", timing.dense, sp, c))
        dsum, ssum = timing.dense.scaled(c), sp.scaled(c)
        total_d = dsum if total_d is None else total_d + dsum
        total_s = ssum if total_s is None else total_s + ssum
    assert total_d is not None and total_s is not None
    rows.append(BenchRow("all linear layers", total_d, total_s))
    env = env_info()
    return BenchResult("torch", env.get("gpu", "cuda"), f"{precision}, {method}", tuple(profiles.values()), tuple(rows),
                       tuple(notes), {"max_rel_err_sparse_vs_dense_kernel": worst}, env)


# ------------------------------------------------------------------------------------------------ tensorrt backend


class TrtRunner:
    """One engine with torch CUDA buffers, run by ``execute_async_v3`` on a private stream."""

    def __init__(self, engine_bytes: bytes, feeds: Mapping[str, np.ndarray], trt: Any | None = None) -> None:
        import torch

        from permsparse.runtime.trt import import_tensorrt

        self.trt = trt or import_tensorrt()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise PermsparseError("TensorRT could not deserialize the engine (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        for name in names:
            if self.engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT:
                if name not in feeds:
                    raise PermsparseError(f"engine input '{name}' has no data; give its shape with --shapes")
                dt = self._torch_dtype(self.engine.get_tensor_dtype(name))
                t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda").to(dt).contiguous()
                self.inputs[name] = t
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
        for name in names:
            if self.engine.get_tensor_mode(name) == self.trt.TensorIOMode.OUTPUT:
                shape = tuple(self.context.get_tensor_shape(name))
                dt = self._torch_dtype(self.engine.get_tensor_dtype(name))
                t = torch.empty(shape, dtype=dt, device="cuda")
                self.outputs[name] = t
                self.context.set_tensor_address(name, t.data_ptr())

    def _torch_dtype(self, dt: Any) -> Any:
        import torch

        D = self.trt.DataType
        table = {D.FLOAT: torch.float32, D.HALF: torch.float16, D.INT32: torch.int32, D.INT8: torch.int8, D.BOOL: torch.bool}
        for name, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
            if hasattr(D, name):
                table[getattr(D, name)] = tdt
        return table[dt]

    def __call__(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise PermsparseError("TensorRT execute_async_v3 failed")

    def run(self) -> list[np.ndarray]:
        self()
        self.stream.synchronize()
        return [t.float().cpu().numpy() for t in self.outputs.values()]


def _engine_bytes(path: Path, config: BenchConfig, tmp: str) -> bytes:
    if path.suffix in (".plan", ".engine", ".trt"):
        return path.read_bytes()
    from permsparse.runtime.trt import BuildConfig, build_engine

    out = Path(tmp) / (path.stem + ".plan")
    report = build_engine(path, out, BuildConfig(precision=config.precision or "fp16", shapes=config.shapes,
                                                 workspace_gb=config.workspace_gb))
    logger.info("%s", report.summary())
    return out.read_bytes()


def _bench_tensorrt(sparse_path: Path, dense_path: Path, config: BenchConfig, iters: int, warmup: int) -> BenchResult:
    torch = _require_cuda("tensorrt")
    onnx_for_shapes = sparse_path if sparse_path.suffix == ".onnx" else dense_path
    if onnx_for_shapes.suffix != ".onnx":
        raise PermsparseError("give at least one ONNX model so input shapes and feeds can be derived")
    model, inputs, profiles = _opt_shapes(onnx_for_shapes, config)
    feeds = random_feeds(model, {k: v.opt for k, v in profiles.items()}, seed=config.seed or 0)
    stats, outs = {}, {}
    with tempfile.TemporaryDirectory(prefix="permsparse-bench-") as tmp:
        for tag, path in (("dense", dense_path), ("sparse", sparse_path)):
            runner = TrtRunner(_engine_bytes(path, config, tmp), feeds)
            outs[tag] = runner.run()
            inner = auto_inner(runner, cuda=True)
            with torch.cuda.stream(runner.stream):
                stats[tag] = time_callable(runner, iters=iters, warmup=warmup, cuda=True, stream=runner.stream, inner=inner)
    check = {}
    if sparse_path.suffix == ".onnx":
        with Session(sparse_path, threads=config.threads) as sess:
            ref = list(sess.run(feeds).values())
        check = {"sparse_engine_vs_ort_" + k: v for k, v in agreement(ref, outs["sparse"]).items()}
    from permsparse.runtime.torch_sparse import env_info

    env = env_info()
    row = BenchRow(sparse_path.stem, stats["dense"], stats["sparse"])
    return BenchResult("tensorrt", env.get("gpu", "cuda"), config.precision or "fp16", tuple(profiles.values()), (row,),
                       (), check, env)


# ------------------------------------------------------------------------------------------------------- entry


def run_bench(
    sparse_path: str | os.PathLike[str], dense_path: str | os.PathLike[str], config: BenchConfig | None = None
) -> BenchResult:
    """Time ``dense_path`` vs ``sparse_path`` with ``config.backend``; writes ``config.plot_path`` if given."""
    config = config or BenchConfig()
    backend = config.backend or "ort"
    if backend not in BACKENDS:
        raise PermsparseError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    sparse_path, dense_path = Path(sparse_path), Path(dense_path)
    for p in (sparse_path, dense_path):
        if not p.is_file():
            raise PermsparseError(f"{p}: no such file (check the path)")
    if backend != "tensorrt":
        load_model(sparse_path, check=False)
        load_model(dense_path, check=False)
    iters = 50 if config.iters is None else config.iters
    warmup = 10 if config.warmup is None else config.warmup
    if iters < 1 or warmup < 0:
        raise PermsparseError("--iters must be >= 1 and --warmup >= 0")
    fn = {"ort": _bench_ort, "torch": _bench_torch, "tensorrt": _bench_tensorrt}[backend]
    result = fn(sparse_path, dense_path, config, iters, warmup)
    if config.plot_path:
        plot_result(result, config.plot_path)
    return result


def write_json(result: BenchResult, path: str | os.PathLike[str]) -> Path:
    return atomic_write_text(path, json.dumps(result.to_dict(), indent=2, default=str))
