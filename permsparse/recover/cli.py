"""``permsparse recover``: the verb's parser and options (kept here so ``cli.py`` only registers them; the handler is
:func:`permsparse.cli_verbs._cmd_recover`, like every verb's)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from permsparse.devices import DEVICES, PRECISIONS
from permsparse.recover.config import RECOVER_PARAMS


def add_recover_options(p: argparse.ArgumentParser, *, verb: bool) -> None:
    """Options shared by ``recover`` and ``optimize`` (``--recover-steps`` etc.)."""
    p.add_argument("--recover-steps", type=int, default=None, metavar="S",
                   help="optimizer steps of recovery" + (" (default 100)" if verb else " (default: no recovery)"))
    p.add_argument("--recover-minutes", type=float, default=None, metavar="M",
                   help="wall-clock budget of recovery in minutes (with --recover-steps: whichever ends first)")
    p.add_argument("--recover-params", choices=RECOVER_PARAMS, default=None,
                   help="all: kept weights + biases + norms (default); norms: only norms and biases (PERP)")
    p.add_argument("--recover-lr", type=float, default=None, metavar="LR",
                   help="AdamW peak learning rate of recovery (default by model kind and --recover-params: "
                        "decoders 4e-4, encoders 2e-4 with all; 1e-3 with norms; permsparse.recover.config.DEFAULT_LR)")
    p.add_argument("--recover-precision", choices=PRECISIONS, default=None,
                   help="auto (default): bf16 matrix products (fp32 weights and optimizer) where the device "
                        "multiplies bf16 natively (Ampere+ GPUs, CPUs with AVX512-BF16/AMX), else fp32; fp32; bf16")
    if verb:
        p.add_argument("--device", choices=DEVICES, default=None,
                       help="torch device: cpu (default), cuda, or auto (cuda when torch sees one)")


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None],
               handler: Callable[[argparse.Namespace], Any]) -> None:
    p = sub.add_parser(
        "recover", help="distil a sparse model from its dense teacher, masks frozen (recovery)",
        description="Trains the kept weights, biases and norms of SPARSE.onnx (2:4 masks frozen, same graph) against "
        "the dense TEACHER: KL of next-token distributions + per-block hidden states (decoders), output + pooled "
        "cosine + per-block term (encoders); writes the best held-out weights, never worse than the input.")
    common(p)
    p.add_argument("model", type=Path, metavar="SPARSE.onnx", help="the sparse model (written by optimize)")
    p.add_argument("--teacher", type=Path, required=True, metavar="DENSE.onnx", help="the dense model it came from")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx", help="ONNX file to write")
    add_recover_options(p, verb=True)
    p.add_argument("--lr", type=float, default=None, help="same as --recover-lr")
    p.add_argument("--calib", default=None, metavar="FILE|DIR",
                   help="training text: .txt (one text per line), .json/.jsonl or a folder of .txt (default: built-in)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="the model's tokenizer (default: beside it)")
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="keep checkpoints and the teacher cache here; a killed recovery resumes from it")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=handler)


def config_from_args(args: argparse.Namespace, *, verb: bool):
    """A RecoverConfig from the parsed options (``None`` when optimize was not asked to recover)."""
    from permsparse.recover.config import RecoverConfig

    steps, minutes = getattr(args, "recover_steps", None), getattr(args, "recover_minutes", None)
    if not verb and steps is None and minutes is None:
        return None
    lr = getattr(args, "recover_lr", None) or getattr(args, "lr", None) if verb else getattr(args, "recover_lr", None)
    cfg = RecoverConfig(
        steps=steps, minutes=minutes, params=getattr(args, "recover_params", None), lr=lr,
        device=getattr(args, "device", None), calib=getattr(args, "calib", None),
        tokenizer=getattr(args, "tokenizer", None), work_dir=getattr(args, "work_dir", None),
        seed=getattr(args, "seed", None), progress=not getattr(args, "quiet", False),
        precision=getattr(args, "recover_precision", None))
    cfg.resolved()  # bad values fail before any work
    return cfg


__all__ = ["add_parser", "add_recover_options", "config_from_args"]
