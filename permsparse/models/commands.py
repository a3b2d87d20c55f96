"""The ``permsparse export`` CLI subcommand."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from permsparse.models.export import EXPORTERS, MODEL_NAMES, export_model, summarize_onnx

logger = logging.getLogger(__name__)

SIZES = ("tiny", "small", "b16", "1b")


def add_export_parser(subparsers: Any) -> None:
    """Register ``export {minilm,vit,llama,hf} -o OUT.onnx [--exporter] [--size] [--seed] [--hf-dir]``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="export a built-in or local Hugging Face model to ONNX",
        description=(
            "Export a model to ONNX with a dynamic batch (and sequence) axis. minilm: the real all-MiniLM-L6-v2 "
            "(offline); vit, llama: seeded test models (--size: vit tiny|small|b16, llama tiny|small|1b); "
            "hf: a local Hugging Face checkpoint directory (--hf-dir). Weights over ~1.8 GB go to OUT.onnx.data."
        ),
    )
    parser.add_argument("model", choices=MODEL_NAMES, help="which model to export")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="ONNX file to write")
    parser.add_argument(
        "--exporter", choices=("dynamo", "legacy"), default="dynamo",
        help="torch.onnx exporter: dynamo (torch.export, default) or legacy (TorchScript)",
    )
    parser.add_argument("--size", choices=SIZES, default="tiny", help="preset size for vit/llama (default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in models' weights (default 0)")
    parser.add_argument("--hf-dir", metavar="DIR", default=None, help="local Hugging Face checkpoint (model hf)")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``permsparse export``; returns the exit code. Raises PermsparseError on user errors."""
    assert args.exporter in EXPORTERS
    start = time.perf_counter()
    path = export_model(
        args.model, args.output, exporter=args.exporter, size=args.size, seed=args.seed, hf_dir=args.hf_dir
    )
    elapsed = time.perf_counter() - start
    info = summarize_onnx(path)
    ins = ", ".join(f"{k}{v}" for k, v in info["inputs"].items())
    outs = ", ".join(f"{k}{v}" for k, v in info["outputs"].items())
    extra = f" + {path.name}.data" if info["external_data"] else ""
    print(
        f"exported {args.model} ({args.exporter}) -> {path}{extra}: {info['bytes'] / 1e6:.1f} MB, "
        f"{info['nodes']} nodes, {info['linear_matmuls']} MatMul weights, {ins} -> {outs}, {elapsed:.1f} s"
    )
    return 0
