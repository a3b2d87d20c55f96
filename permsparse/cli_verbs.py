"""The verbs behind the command line: each turns parsed arguments into an API call and an :class:`Outcome`."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a verb says: human text, and the same facts as JSON-friendly data."""

    text: str
    data: dict[str, Any] = field(default_factory=dict)


def _shape_specs(args: argparse.Namespace) -> dict:
    from permsparse.ir.shapes import merge_profile_args

    return merge_profile_args(list(args.shapes) + list(args.input_shapes), args.minShapes, args.optShapes,
                              args.maxShapes) or {}



def check_folder(path: Path | None, flag: str) -> None:
    """Refuse, before any work, a folder option that cannot be created: a file in the way, or no write permission
    (nothing is created here)."""
    import os

    from permsparse.errors import UsageError

    if path is None:
        return
    p = Path(path)
    for candidate in (p, *p.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise UsageError(f"{flag} {p}: {candidate} is a file, not a folder; choose another {flag}")
            if not os.access(candidate, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {p}: cannot write in {candidate}; choose another {flag}")
            return


def _cmd_optimize(args: argparse.Namespace) -> Outcome:
    from permsparse.api import optimize
    from permsparse.pipeline.config import OptimizeConfig

    check_folder(args.report, "--report")
    check_folder(args.work_dir, "--work-dir")
    log.info("optimize %s -> %s: loading libraries ...", args.model, args.output)

    learned = None
    if args.learn_window or args.learn_iters:
        from permsparse.optimizer.learned import LearnedConfig

        kw: dict[str, Any] = {}
        if args.learn_window:
            kw["window"] = args.learn_window
        if args.learn_iters:
            kw["iterations"] = args.learn_iters
        learned = LearnedConfig(**kw)
    given = {k: getattr(args, k) for k in ("method", "policy", "pattern", "importance", "objective", "reconstruct",
                                           "sequential", "finetune_epochs", "finetune_lr", "block_steps", "teacher", "damp",
                                           "calib", "calib_samples", "calib_seq_len", "tokenizer", "seed",
                                           "budget_s", "workers", "rtol", "check", "cluster", "work_dir", "device")
             if getattr(args, k) is not None}
    cfg = OptimizeConfig(  # None = not given: the default, or the recipe's value when replaying
        **given,
        mask=False if args.no_mask else None,
        prune_head=True if args.prune_head else None,
        exclude=tuple(args.exclude) or None,
        shapes=_shape_specs(args) or None,
        learned=learned,
        evaluate=args.report is not None,
        progress=not args.quiet,
        recover=_recover_config(args),
    )
    if args.recipe is None:
        cfg.resolved()  # bad options fail here, before any work
    # unresolved: defaults may adapt to the model, given options not; a recipe is checked and merged by the API
    result = optimize(args.model, args.output, cfg, recipe=args.recipe)
    cfg = result.config
    from permsparse.report import quality_lines
    from permsparse.summary import optimize_summary

    lines = [optimize_summary(result), *quality_lines(result)]
    data: dict[str, Any] = {
        "output": str(args.output),
        "pattern": str(cfg.pattern),
        "config": cfg.to_dict(),  # the resolved options (model-dependent defaults included), as the recipe records them
        "weights_pruned": len(result.selected),
        "nm_valid": sum(result.nm_valid.values()),
        "permutations": len(result.units.units),
        "gathers": len(result.fold.gathers),
        "fold_check": {"max_rel_error": result.equivalence.max_rel_error, "rtol": result.equivalence.rtol,
                       "method": result.equivalence.method},
        "timings": result.timings,
        "quality": result.quality,
    }
    if result.recovery is not None:
        r = result.recovery
        lines.append(f"recovery: held-out {r['metric']} {r['heldout_before']:.4g} -> {r['heldout_best']:.4g} in "
                     f"{r['steps']} steps ({r['tokens']} tokens, {r['seconds']:.0f} s)")
        data["recovery"] = r
    if args.report:
        from permsparse.report import write_report

        try:
            path = write_report(result, args.report)
        except KeyboardInterrupt:
            from permsparse.errors import Interrupted
            from permsparse.pipeline.recipe import recipe_path

            raise Interrupted(f"interrupted while writing the report: {args.output} and "
                              f"{recipe_path(args.output).name} were written (complete and checked); the report "
                              "may be incomplete") from None
        lines.append(f"report: {path}")
        data["report"] = str(path)
    if result.recovery is None and not args.no_mask and _text_model(args.model):
        lines.append(f"recovery is off: add --recover-steps 460 (or run `permsparse recover {args.output} --teacher "
                     f"{args.model} -o OUT.onnx`) to train the kept weights against the dense model with the masks "
                     "frozen (SmolLM2-135M: 3.5x -> 1.7x dense perplexity out of domain in ~460 steps, 30 minutes on "
                     "2 CPU cores; README, Recovery)")
    lines.append(f"wrote {args.output} ({'dense, permuted' if args.no_mask else f'{cfg.pattern} sparse'}) "
                 f"in {result.timings['total']:.1f} s")
    return Outcome("\n".join(lines), data)


def _text_model(path) -> bool:
    """Whether recovery applies to the model at ``path`` (text decoders and encoders)."""
    from permsparse.data.kinds import model_file, model_kind

    try:
        return model_kind(model_file(path)) in ("lm", "text")
    except Exception:  # noqa: BLE001  (a hint only: never fail the command for it)
        return False


def _recover_config(args: argparse.Namespace):
    from permsparse.recover.cli import config_from_args

    return config_from_args(args, verb=False)


def _cmd_inspect(args: argparse.Namespace) -> Outcome:
    from permsparse.api import inspect
    from permsparse.inspection import InspectConfig
    from permsparse.summary import inspect_table

    result = inspect(args.model, InspectConfig(pattern=args.pattern, shapes=_shape_specs(args) or None))
    table = inspect_table(result, verbose=getattr(args, "verbose", 0) > 0)
    return Outcome(table + "\n" + result.explanation(), result.to_dict())


def _cmd_build(args: argparse.Namespace) -> Outcome:
    from permsparse.api import build
    from permsparse.runtime.trt import BuildConfig

    out = args.output or args.model.with_suffix(".plan")
    config = BuildConfig(
        precision=args.precision, sparse=args.sparse, shapes=_shape_specs(args), workspace_gb=args.workspace,
        timing_cache=args.timing_cache, keep_fp32_ops=tuple(args.keep_fp32) if args.keep_fp32 else None,
        precision_mode=args.precision_mode, log_path=args.trt_log,
    )
    report = build(args.model, out, config)
    data = {"engine": str(report.engine_path), "bytes": report.engine_bytes, "module": report.module,
            "precision": report.precision, "seconds": report.build_seconds, "sparse_layers": report.n_sparse,
            "candidates": report.n_candidates,
            "layers": [{"layer": x.node, "k": x.k, "n": x.n, "nm_valid": x.is_2to4, "status": x.status,
                        "reason": x.reason} for x in report.layers]}
    return Outcome(report.summary(), data)


def _cmd_bench(args: argparse.Namespace) -> Outcome:
    from permsparse.api import bench
    from permsparse.runtime.bench import BenchConfig, write_json

    plot = None if args.no_plot else (args.plot or args.model.with_name(f"{args.model.stem}.bench-{args.backend}.png"))
    config = BenchConfig(backend=args.backend, shapes=_shape_specs(args), iters=args.iters, warmup=args.warmup,
                         precision=args.precision, sparse_method=args.sparse_method, threads=args.threads,
                         device=args.device,
                         plot_path=plot)
    result = bench(args.model, args.dense, config)
    lines = [result.table()]
    if plot:
        lines.append(f"plot: {plot}")
    if args.save_json:
        write_json(result, args.save_json)
        lines.append(f"json: {args.save_json}")
    return Outcome("\n".join(lines), result.to_dict())


def _cmd_export(args: argparse.Namespace) -> Outcome:
    import time

    from permsparse.api import ExportConfig, export
    from permsparse.models.export import summarize_onnx

    start = time.perf_counter()
    log.info("export %s (%s exporter): building the model and tracing it to ONNX ...", args.model, args.exporter)
    path = export(args.model, args.output, ExportConfig(exporter=args.exporter, size=args.size, seed=args.seed,
                                                        hf_dir=args.hf_dir, dtype=args.dtype))
    elapsed = time.perf_counter() - start
    info = summarize_onnx(path)
    ins = ", ".join(f"{k}{v}" for k, v in info["inputs"].items())
    outs = ", ".join(f"{k}{v}" for k, v in info["outputs"].items())
    extra = f" + {path.name}.data" if info["external_data"] else ""
    text = (f"exported {args.model} ({args.exporter}) -> {path}{extra}: {info['bytes'] / 1e6:.1f} MB, "
            f"{info['nodes']} nodes, {info['linear_matmuls']} MatMul weights, {ins} -> {outs}, {elapsed:.1f} s")
    return Outcome(text, {**info, "seconds": elapsed})


def _cmd_recover(args: argparse.Namespace) -> Outcome:
    from permsparse.recover import recover
    from permsparse.recover.cli import config_from_args

    res = recover(args.model, args.teacher, args.output, config_from_args(args, verb=True))
    name = "perplexity" if res.metric == "ppl" else "pooled cosine"
    verdict = (f"{res.heldout_before:.4g} -> {res.heldout_best:.4g} (best at step {res.best_step})" if res.improved
               else f"{res.heldout_before:.4g}, not improved: the input's weights were written")
    text = (f"recovered {args.model} -> {res.output}: held-out {name} {verdict}; {res.steps} steps, {res.tokens} "
            f"tokens, {res.seconds:.0f} s on {res.device} ({res.precision}), {res.trained_tensors} tensors trained ({res.params}), "
            f"{res.masked_weights} weights kept 2:4, peak RSS {res.peak_rss_mb:.0f} MB")
    return Outcome(text, res.to_dict())
