"""argparse wiring for ``permsparse build`` and ``permsparse bench`` (registered by ``permsparse.cli``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from permsparse.errors import PermsparseError

logger = logging.getLogger(__name__)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def add_build_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "build",
        help="build a TensorRT / TensorRT-RTX engine with sparse weights",
        description="Parse an ONNX model with the installed TensorRT (tensorrt preferred, else tensorrt_rtx), "
        "enable sparse weights, and report which MatMul/Gemm layers got (or can get) sparse tactics.",
    )
    p.add_argument("model", type=Path, help="ONNX model (e.g. the output of `permsparse optimize`)")
    p.add_argument("-o", "--output", type=Path, default=None, help="engine file (default: MODEL with .plan)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="engine precision (strongly typed TensorRT: converts the ONNX; TensorRT 8/10: builder flag)")
    p.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="same as --precision fp16")
    p.add_argument("--sparse", dest="sparse", action="store_true", default=True, help="enable sparse weights (default)")
    p.add_argument("--no-sparse", dest="sparse", action="store_false", help="build a dense engine")
    p.add_argument("--shapes", nargs="+", action="extend", default=None, metavar="NAME:MIN,OPT,MAX",
                   help="input shapes, e.g. input_ids:1x8,4x128,8x512 (or NAME:SHAPE for a fixed shape)")
    p.add_argument("--workspace", type=_positive_float, default=None, metavar="GB", help="workspace limit in GiB")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="FILE", help="timing cache to read and update")
    p.add_argument("--precision-mode", choices=("auto", "flags", "onnx"), default="auto",
                   help="how to get fp16/bf16: builder flags (TensorRT 8/10) or ONNX conversion (default: auto)")
    p.add_argument("--keep-fp32", nargs="+", default=None, metavar="OP",
                   help="op types kept in fp32 by the conversion (default: norms, softmax, reductions, Pow, Sqrt)")
    p.add_argument("--trt-log", type=Path, default=None, metavar="FILE", help="write TensorRT's verbose log there")
    p.set_defaults(func=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    from permsparse.runtime.shapes import parse_shapes
    from permsparse.runtime.trt import BuildConfig, build_engine

    out = args.output or args.model.with_suffix(".plan")
    config = BuildConfig(
        precision=args.precision,
        sparse=args.sparse,
        shapes=parse_shapes(args.shapes),
        workspace_gb=args.workspace,
        timing_cache=args.timing_cache,
        keep_fp32_ops=tuple(args.keep_fp32) if args.keep_fp32 else None,
        precision_mode=args.precision_mode,
        log_path=args.trt_log,
    )
    report = build_engine(args.model, out, config)
    print(report.summary())
    return 0


def add_bench_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="latency of the sparse model vs the dense one (table + bar plot)",
        description="Time a sparse model against its dense original: median and p90 latency, speed-up, plot.",
    )
    p.add_argument("model", type=Path, help="sparse ONNX model (or a .plan for --backend tensorrt)")
    p.add_argument("--dense", type=Path, required=True, help="the dense ONNX model (or .plan) to compare with")
    p.add_argument("--backend", choices=("tensorrt", "torch", "ort"), default="ort",
                   help="tensorrt: engines (GPU); torch: the MatMuls, dense vs semi-structured (GPU); ort: CPU")
    p.add_argument("--shapes", nargs="+", action="extend", default=None, metavar="NAME:SHAPE",
                   help="input shapes to time (the OPT of NAME:MIN,OPT,MAX), e.g. input_ids:8x128")
    p.add_argument("--iters", type=_positive_int, default=50, help="timed samples (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up calls (default 10)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="torch/tensorrt precision (default fp16); ort runs the models as stored")
    p.add_argument("--sparse-method", choices=("semi", "cutlass", "cusparselt", "cslt"), default=None,
                   help="torch backend's sparse kernel (default: semi = torch's default semi-structured backend)")
    p.add_argument("--threads", type=_positive_int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--plot", type=Path, default=None, help="bar plot PNG (default: MODEL.bench-BACKEND.png beside the sparse model)")
    p.add_argument("--no-plot", action="store_true", help="do not write a plot")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from permsparse.runtime.bench import BenchConfig, run_bench, write_json
    from permsparse.runtime.shapes import parse_shapes

    if args.warmup < 0:
        raise PermsparseError("--warmup must be >= 0")
    plot = None if args.no_plot else (args.plot or args.model.with_name(f"{args.model.stem}.bench-{args.backend}.png"))
    config = BenchConfig(
        backend=args.backend,
        shapes=parse_shapes(args.shapes),
        iters=args.iters,
        warmup=args.warmup,
        precision=args.precision,
        sparse_method=args.sparse_method,
        threads=args.threads,
        plot_path=plot,
    )
    result = run_bench(args.model, args.dense, config)
    print(result.table())
    if plot:
        print(f"plot: {plot}")
    if args.json:
        write_json(result, args.json)
        print(f"json: {args.json}")
    return 0
