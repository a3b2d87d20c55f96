"""Command line: ``permsparse optimize | inspect | export | build | bench``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from permsparse.errors import PermsparseError

log = logging.getLogger("permsparse")


def _pattern(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"pattern must look like 2:4, got {text!r}") from None
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"pattern N:M needs 0 < N < M, got {text!r}")
    return n, m


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    try:
        name, dims = text.rsplit(":", 1)
        return name, tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must look like NAME:1x3x224x224, got {text!r}") from None


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-shape",
        action="append",
        type=_input_shape,
        default=[],
        metavar="NAME:DxDx..",
        help="concrete shape of a graph input for analysis and checks (repeatable), e.g. pixel_values:1x3x224x224",
    )


def _cmd_optimize(args: argparse.Namespace) -> int:
    from permsparse.optimizer.methods import METHODS
    from permsparse.pipeline import OptimizeConfig, optimize
    from permsparse.summary import optimize_summary

    if args.method not in METHODS:
        raise PermsparseError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    learned = None
    if args.method == "learned" and (args.objective != "importance" or args.learn_window or args.learn_iters):
        from permsparse.optimizer.learned import LearnedConfig

        kw = {"objective": args.objective}
        if args.learn_window:
            kw["window"] = args.learn_window
        if args.learn_iters:
            kw["iterations"] = args.learn_iters
        learned = LearnedConfig(**kw)
    n, m = args.pattern
    cfg = OptimizeConfig(
        method=args.method,
        policy=args.policy,
        n=n,
        m=m,
        importance=args.importance,
        mask=not args.no_mask,
        prune_head=args.prune_head,
        exclude=tuple(args.exclude),
        input_shapes=dict(args.input_shape) or None,
        calib=args.calib,
        calib_samples=args.calib_samples,
        tokenizer_dir=args.tokenizer,
        seed=args.seed,
        budget_s=args.budget_s,
        workers=args.workers,
        learned=learned,
        progress=not args.quiet,
    )
    result = optimize(args.model, args.output, cfg)
    print(optimize_summary(result))
    if args.report:
        from permsparse.report import write_report

        path = write_report(result, args.model, args.report, cfg)
        print(f"report: {path}")
    print(f"wrote {args.output} ({'dense, permuted' if args.no_mask else f'{n}:{m} sparse'}) in {result.timings['total']:.1f} s")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import onnx_graphsurgeon as gs

    from permsparse.passes.analysis import analyze
    from permsparse.passes.probe import probe, random_feeds, resolve_shapes
    from permsparse.pipeline import load_checked
    from permsparse.summary import inspect_rows, table

    n, m = args.pattern
    model = load_checked(args.model)
    shapes = resolve_shapes(model, dict(args.input_shape) or None)
    pr = probe(model, random_feeds(model, shapes))
    graph = gs.import_onnx(model)
    plan = analyze(graph, pr, n=n, m=m, prune_head=True)
    records = inspect_rows(graph, plan)
    if args.json:
        closures = [
            {
                "id": c.id,
                "block": c.block,
                "k": c.k,
                "siblings": c.siblings,
                "groups": {k: v for k, v in c.groups.items()},
                "foldable": c.foldable,
                "status": c.describe(),
                "boundaries": [b.reason for b in c.boundaries],
                "members": [{"constant": mb.const, "axis": mb.axis, "role": mb.role} for mb in c.members],
            }
            for c in plan.closures
        ]
        print(json.dumps({"model": str(args.model), "pattern": f"{n}:{m}", "weights": records, "closures": closures}, indent=2))
        return 0
    valid_key, kept_key = f"valid_{n}_{m}", f"kept_abs_by_{n}_{m}"
    rows = [
        [
            r["weight"],
            "x".join(map(str, r["shape"])),
            r["k_axis"],
            r["closure"],
            r["fold"] if len(r["fold"]) < 60 else r["fold"][:57] + "...",
            "yes" if r[valid_key] else "no",
            f"{r['density']:.3f}",
            "-" if r[kept_key] is None else f"{r[kept_key]:.4f}",
        ]
        for r in records
    ]
    print(table(["weight", "shape", "K axis", "closure", "fold", f"{n}:{m}", "density", f"|W| kept by {n}:{m}"], rows))
    valid = sum(r[valid_key] for r in records)
    print(f"{len(records)} weights, {valid} valid {n}:{m}; {len(plan.closures)} closures, "
          f"{sum(c.foldable for c in plan.closures)} fold for free")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="permsparse",
        description="2:4 sparsity for ONNX Transformers with learned channel permutations folded into the weights.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="analyze, calibrate, learn permutations, fold, mask, verify, write")
    p.add_argument("model", type=Path, help="input .onnx (fp32; never modified)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .onnx (written atomically)")
    p.add_argument("--method", default="learned", help="identity | lsa | channel_swap | learned (default)")
    p.add_argument("--policy", choices=("fold", "global", "local"), default="local",
                   help="how permutations are realized: fold (no op added), global (one per closure, Gathers at "
                        "blocked boundaries), local (default: one per sibling group, a Gather per cut)")
    p.add_argument("--pattern", type=_pattern, default=(2, 4), help="N:M pattern along K (default 2:4; 4:8 works)")
    p.add_argument("--importance", choices=("magnitude", "wanda", "ria"), default="magnitude",
                   help="weight importance; wanda/ria run calibration")
    p.add_argument("--calib", default=None,
                   help="calibration data: text file, token-id .npy/.txt, image folder or .npy (default: built-in "
                        "real text for text models)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for text calibration data")
    p.add_argument("--no-mask", action="store_true", help="write the permuted dense model (no masks)")
    p.add_argument("--prune-head", action="store_true", help="also prune weights that write a graph output")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="keep weights whose node or constant name matches REGEX dense (repeatable)")
    p.add_argument("--objective", choices=("importance", "output"), default="importance",
                   help="learned method: retained importance (default) or layer-output error")
    p.add_argument("--learn-window", type=int, default=None, help="learned method: channels per learned block")
    p.add_argument("--learn-iters", type=int, default=None, help="learned method: optimizer steps per window")
    p.add_argument("--budget-s", type=float, default=None, help="time budget for learning, in seconds")
    p.add_argument("--workers", type=int, default=None, help="processes for learning (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, default=None, help="write a Markdown quality report with plots to DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_shape_args(p)
    p.set_defaults(func=_cmd_optimize)

    p = sub.add_parser("inspect", help="list weights, closures, fold status and N:M validity")
    p.add_argument("model", type=Path)
    p.add_argument("--pattern", type=_pattern, default=(2, 4))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_shape_args(p)
    p.set_defaults(func=_cmd_inspect)

    from permsparse.models.commands import add_export_parser
    from permsparse.runtime.commands import add_bench_parser, add_build_parser

    add_export_parser(sub)
    add_build_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except PermsparseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
