"""The verbs behind the command line: each turns parsed arguments into an API call and an :class:`Outcome`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    """What a verb says: human text, and the same facts as JSON-friendly data."""

    text: str
    data: dict[str, Any] = field(default_factory=dict)


def _shape_specs(args: argparse.Namespace) -> dict:
    from permsparse.ir.shapes import merge_profile_args

    return merge_profile_args(list(args.shapes) + list(args.input_shapes), args.minShapes, args.optShapes,
                              args.maxShapes) or {}



def _cmd_optimize(args: argparse.Namespace) -> Outcome:
    from permsparse.api import optimize
    from permsparse.config import OptimizeConfig

    learned = None
    if args.learn_window or args.learn_iters:
        from permsparse.optimizer.learned import LearnedConfig

        kw: dict[str, Any] = {}
        if args.learn_window:
            kw["window"] = args.learn_window
        if args.learn_iters:
            kw["iterations"] = args.learn_iters
        learned = LearnedConfig(**kw)
    options: dict[str, Any] = {}
    recipe_perms = None
    if args.recipe is not None:
        from permsparse.recipe import read_recipe

        doc = read_recipe(args.recipe)
        options = {k: v for k, v in doc["options"].items() if k in ("method", "policy", "pattern", "importance",
                                                                    "prune_head", "exclude", "seed")}
        options["exclude"] = tuple(options.get("exclude") or ())
        recipe_perms = doc["units"]
    given = {k: getattr(args, k) for k in ("method", "policy", "pattern", "importance", "objective", "reconstruct",
                                           "sequential", "finetune_epochs", "finetune_lr", "block_steps", "teacher", "damp",
                                           "calib", "calib_samples", "calib_seq_len", "tokenizer", "seed",
                                           "budget_s", "workers", "rtol", "check", "cluster", "work_dir") if getattr(args, k) is not None}
    options.update(given)
    cfg = OptimizeConfig(
        **options,
        mask=not args.no_mask,
        prune_head=args.prune_head or options.get("prune_head"),
        exclude=tuple(args.exclude) or options.get("exclude"),
        shapes=_shape_specs(args) or None,
        learned=learned,
        recipe_perms=recipe_perms,
        evaluate=args.report is not None,
        progress=not args.quiet,
        recover=_recover_config(args),
    )
    cfg.resolved()  # bad options fail here, before any work
    result = optimize(args.model, args.output, cfg)  # unresolved: defaults may adapt to the model, given options not
    cfg = result.config
    from permsparse.report import quality_lines
    from permsparse.summary import optimize_summary

    lines = [optimize_summary(result), *quality_lines(result)]
    data: dict[str, Any] = {
        "output": str(args.output),
        "pattern": str(cfg.pattern),
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

        path = write_report(result, args.report)
        lines.append(f"report: {path}")
        data["report"] = str(path)
    lines.append(f"wrote {args.output} ({'dense, permuted' if args.no_mask else f'{cfg.pattern} sparse'}) "
                 f"in {result.timings['total']:.1f} s")
    return Outcome("\n".join(lines), data)


def _recover_config(args: argparse.Namespace):
    from permsparse.recover.cli import config_from_args

    return config_from_args(args, verb=False)


def _cmd_inspect(args: argparse.Namespace) -> Outcome:
    from permsparse.api import inspect
    from permsparse.inspection import InspectConfig
    from permsparse.summary import inspect_table

    result = inspect(args.model, InspectConfig(pattern=args.pattern, shapes=_shape_specs(args) or None))
    return Outcome(inspect_table(result), result.to_dict())


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
