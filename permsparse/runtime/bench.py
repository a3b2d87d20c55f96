"""``permsparse bench``: dense vs sparse latency on one backend, as a table and a bar plot.

Each backend is a :class:`~permsparse.runtime.backends.Runner` (activate / infer / bind / deactivate), one module per
backend under ``permsparse/runtime/backends/``, registered by name (``ort``, ``torch``, ``tensorrt``; see
:func:`~permsparse.runtime.backends.backend_names`). :func:`run_bench` is the same for all of them: random feeds at
the ``opt`` shapes, the dense model's runner, then the sparse model's (one at a time, so only one model is loaded),
each run once for the outputs and then timed (CUDA events when the runner computes on CUDA), plus any extra dense
baselines the backend offers (torch: ``torch.compile``). Outputs are compared dense vs sparse (the drift), and the
sparse model's against onnxruntime when the backend is not onnxruntime and the model is small.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from permsparse.errors import PermsparseError
from permsparse.ir.compare import agreement
from permsparse.ir.inputs import InputSpec, graph_inputs, random_feeds
from permsparse.ir.model import load_model
from permsparse.ir.save import atomic_write_bytes, atomic_write_text
from permsparse.ir.session import Session
from permsparse.ir.shapes import ShapeSpec, derive_profiles
from permsparse.runtime.backends import BenchConfig, Runner, get_backend
from permsparse.runtime.timing import TimingStats, auto_inner, time_callable

logger = logging.getLogger(__name__)



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
        """The model row: dense vs sparse on the same backend (extra rows compare other dense baselines)."""
        return self.rows[0]

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


#: The sparse model is also run on onnxruntime (CPU) as a reference when its file is at most this big.
ORT_CHECK_MAX_BYTES = 600_000_000


def _measure(runner: Runner, feeds: Mapping[str, np.ndarray], iters: int, warmup: int
             ) -> tuple[list[np.ndarray], TimingStats, dict[str, float], str, str]:
    """Outputs of one run, timing of the bound callable, the runner's checks, precision and device (while active)."""
    with runner:
        outs = list(runner.infer(feeds).values())
        fn = runner.bind(feeds)
        inner = auto_inner(fn, cuda=runner.on_cuda)
        if runner.on_cuda:
            import torch

            stream = runner.stream
            ctx = torch.cuda.stream(stream) if stream is not None else _nullcontext()
            with ctx:
                stats = time_callable(fn, iters=iters, warmup=warmup, cuda=True, stream=stream, inner=inner)
        else:
            stats = time_callable(fn, iters=iters, warmup=warmup, inner=inner)
        return outs, stats, dict(runner.checks), runner.precision, runner.device_name


def _nullcontext() -> Any:
    import contextlib

    return contextlib.nullcontext()


def run_bench(
    sparse_path: str | os.PathLike[str], dense_path: str | os.PathLike[str], config: BenchConfig | None = None
) -> BenchResult:
    """Time ``dense_path`` vs ``sparse_path`` with ``config.backend``; writes ``config.plot_path`` if given."""
    config = config or BenchConfig()
    backend = config.backend or "ort"
    cls = get_backend(backend)
    sparse_path, dense_path = Path(sparse_path), Path(dense_path)
    for p in (sparse_path, dense_path):
        if not p.is_file():
            raise PermsparseError(f"{p}: no such file (check the path)")
    iters = 50 if config.iters is None else config.iters
    warmup = 10 if config.warmup is None else config.warmup
    if iters < 1 or warmup < 0:
        raise PermsparseError("--iters must be >= 1 and --warmup >= 0")
    onnx_for_shapes = sparse_path if sparse_path.suffix == ".onnx" else dense_path
    if onnx_for_shapes.suffix != ".onnx":
        raise PermsparseError("give at least one ONNX model so input shapes and feeds can be derived")
    model, _, profiles = _opt_shapes(onnx_for_shapes, config)
    feeds = random_feeds(model, {k: v.opt for k, v in profiles.items()}, seed=config.seed or 0)
    del model
    runs: dict[str, tuple[list[np.ndarray], TimingStats, dict[str, float], str, str]] = {}
    notes: list[str] = []
    for tag, path, kwargs in [("dense", dense_path, {}), ("sparse", sparse_path, {}),
                              *[(label, dense_path, kw) for label, kw in cls.baselines(config)]]:
        runner = cls(path, config, label=tag, **kwargs)
        try:
            runs[tag] = _measure(runner, feeds, iters, warmup)
        except PermsparseError:
            raise
        except Exception as exc:
            if tag in ("dense", "sparse"):
                raise PermsparseError(f"{backend} backend, {tag} model {path}: {type(exc).__name__}: {exc}") from exc
            notes.append(f"{tag}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})")
            continue
        notes.extend(n if tag == "sparse" else f"{tag} model: {n}" for n in runner.notes
                     if tag == "sparse" or not n.startswith("no 2:4 weight"))
        if backend == "ort" and tag == "sparse":
            notes.append(cls.note)  # type: ignore[attr-defined]
    (d_out, d_st, _, _, _), (s_out, s_st, s_checks, precision, device) = runs["dense"], runs["sparse"]
    rows = [BenchRow(sparse_path.stem, d_st, s_st)]
    rows += [BenchRow(f"{sparse_path.stem} vs {tag}", st, s_st) for tag, (_, st, _, _, _) in runs.items()
             if tag not in ("dense", "sparse")]
    check = {f"dense_vs_sparse_{k}": v for k, v in agreement(d_out, s_out).items()}
    check.update(s_checks)
    reference = config.reference
    if reference is None:
        reference = backend != "ort" and _model_bytes(sparse_path) <= ORT_CHECK_MAX_BYTES
    if reference and sparse_path.suffix == ".onnx":
        with Session(sparse_path, threads=config.threads) as sess:
            names = [n for n in sess.input_names]
            ref = list(sess.run({k: feeds[k] for k in names}).values())
        check.update({f"sparse_vs_ort_{k}": v for k, v in agreement(ref, s_out).items()})
    env: dict[str, str] = {}
    if backend != "ort":
        try:
            from permsparse.runtime.torch_sparse import env_info

            env = env_info()
        except Exception as exc:  # torch missing: the table still stands
            logger.info("no environment record: %s", exc)
    result = BenchResult(backend, device, precision, tuple(profiles.values()), tuple(rows), tuple(notes), check, env)
    if config.plot_path:
        plot_result(result, config.plot_path)
    return result


def _model_bytes(path: Path) -> int:
    total = path.stat().st_size
    for extra in path.parent.glob(path.name + ".data"):
        total += extra.stat().st_size
    return total


def write_json(result: BenchResult, path: str | os.PathLike[str]) -> Path:
    return atomic_write_text(path, json.dumps(result.to_dict(), indent=2, default=str))
