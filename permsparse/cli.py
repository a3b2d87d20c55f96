"""Command line: ``permsparse optimize | inspect | build | bench | export`` — a thin layer over :mod:`permsparse.api`.

Conventions (the same on every verb): ``-v``/``-q``/``--log-file FILE``/``--json`` before or after the verb; shapes as
``--shapes name:1x128`` (or ``name:MIN,OPT,MAX``, or Polygraphy's ``name:[1,128]``), trtexec's
``--minShapes/--optShapes/--maxShapes`` and Polygraphy's ``--input-shapes`` accepted too; exit codes 0 ok,
1 failure, 2 usage, 3 verification refused to write, 130 interrupted. ``--json`` prints one JSON object
``{"command", "ok", ...}`` on stdout (also on failure, with ``error`` and ``exit_code``); errors are one line on
stderr, never a traceback (``-vv`` shows it). Only argparse and permsparse's light modules load before a verb runs, so
``--help`` and ``--version`` are instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from permsparse import __version__
from permsparse import cli_verbs as verbs
from permsparse.errors import PermsparseError, UsageError
from permsparse.models.zoo import EXPORTERS, MODEL_FAMILIES, model_sizes
from permsparse.pipeline.config import (
    CHECKS,
    IMPORTANCES,
    METHODS,
    OBJECTIVES,
    POLICIES,
    RECONSTRUCTIONS,
    TEACHERS,
)
from permsparse.devices import DEVICES
from permsparse.runtime.backends import backend_names
from permsparse.runtime.choices import PRECISION_MODES, PRECISIONS, SPARSE_METHODS

BACKENDS: tuple[str, ...] = backend_names()
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_FAMILIES)
MODEL_SIZES: tuple[str, ...] = model_sizes()

log = logging.getLogger("permsparse")


# ------------------------------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def _pattern(text: str) -> str:
    from permsparse.pattern import NMPattern

    try:
        return str(NMPattern.parse(text))
    except PermsparseError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ------------------------------------------------------------------------------------------------- shared options


def _common(p: argparse.ArgumentParser, top: bool = False) -> None:
    """-v/-q/--log-file/--json; on sub-parsers their defaults are suppressed so the top-level values survive."""
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="count", help="more logging (-vv: debug, with tracebacks)",
                   **({"default": 0} if top else d))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only warnings and errors",
                   **({"default": False} if top else d))
    p.add_argument("--log-file", type=Path, metavar="FILE", help="also write a debug log to FILE",
                   **({"default": None} if top else d))
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout",
                   **({"default": False} if top else d))


def _shapes(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("input shapes")
    g.add_argument("--shapes", nargs="+", action="extend", default=[], metavar="NAME:SHAPE",
                   help=f"{what}: NAME:1x128, NAME:[1,128] or NAME:MIN,OPT,MAX (e.g. input_ids:1x8,4x128,8x512)")
    g.add_argument("--input-shapes", nargs="+", action="extend", default=[], metavar="NAME:[D,...]",
                   help="Polygraphy-style fixed shapes (same as --shapes)")
    for flag in ("minShapes", "optShapes", "maxShapes"):
        g.add_argument(f"--{flag}", action="append", default=[], metavar="NAME:DxD[,NAME:DxD]",
                       help=f"trtexec-style {flag[:3]} shapes" if flag != "optShapes" else "trtexec-style opt shapes")


# ------------------------------------------------------------------------------------------------- parser


class _ArgumentError(Exception):
    """argparse's usage error, raised instead of printing the usage block and exiting (main prints one line)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the README's promise), with a pointer to ``--help``."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _ArgumentError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="permsparse",
        description="2:4 sparsity for ONNX Transformers with learned channel permutations folded into the weights.",
        epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 verification refused to write, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"permsparse {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    p = sub.add_parser("optimize", help="analyze, calibrate, learn permutations, fold, mask, verify, write",
                       description="Make a model N:M sparse with learned channel permutations folded into the "
                       "weights; the permuted dense model is proven equal to the input before anything is written.")
    _common(p)
    p.add_argument("model", type=Path, help="input .onnx (never modified)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .onnx (written atomically)")
    p.add_argument("--method", choices=METHODS, default=None, help="permutation method (default lsa)")
    p.add_argument("--policy", choices=POLICIES, default=None,
                   help="fold: no op added; global: one permutation per closure, Gathers at blocked boundaries; "
                        "local (default): one per sibling group, a Gather per cut")
    p.add_argument("--pattern", type=_pattern, default=None, help="N:M pattern along K (default 2:4)")
    p.add_argument("--importance", choices=IMPORTANCES, default=None,
                   help="mask importance (default wanda); wanda/ria calibrate on real data")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="what permutations optimize: importance kept, each unit's output error (output), or "
                        "PermLLM's joint block output (block)")
    p.add_argument("--reconstruct", choices=RECONSTRUCTIONS, default=None,
                   help="sparsegpt (default): OBS mask choice and update of the kept weights from the calibration "
                        "Hessian, block by block; none: plain masking")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate each block on the outputs of the already pruned blocks (default: on for "
                        "block-wise runs)")
    p.add_argument("--finetune-epochs", type=_nonneg_int, default=None,
                   help="epochs of tuning each block's kept weights with the masks frozen (default 0; 4 for text encoders)")
    p.add_argument("--finetune-lr", type=_positive_float, default=None, help="learning rate of that tuning")
    p.add_argument("--block-steps", type=_positive_int, default=None,
                   help="steps of the joint block learner per block (--objective block, default 30)")
    p.add_argument("--teacher", choices=TEACHERS, default=None,
                   help="block targets: the dense model's outputs (dense) or the dense block on the pruned stream")
    p.add_argument("--damp", type=float, default=None, help="SparseGPT dampening (share of mean diag H, default 0.1)")
    p.add_argument("--calib", default=None, metavar="DATA",
                   help="calibration data: text file, .json/.jsonl, folder of .txt, token ids (.npy/.txt), images "
                        "(default for text models: the built-in mix of real text of five domains; one built-in "
                        "domain by name: wiki, news, film, manuals, comments)")
    p.add_argument("--calib-samples", type=_positive_int, default=None, help="calibration examples (default 128)")
    p.add_argument("--calib-seq-len", type=_positive_int, default=None, help="tokens per example (default 128)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder (default: the one beside the model, else the built-in one)")
    p.add_argument("--no-mask", action="store_true", help="write the permuted dense model (no masks)")
    p.add_argument("--prune-head", action="store_true", help="also prune weights that write a graph output")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="keep weights whose node, constant or layer name matches REGEX dense (repeatable)")
    p.add_argument("--learn-window", type=_positive_int, default=None, help="learned: channels per learned block")
    p.add_argument("--learn-iters", type=_positive_int, default=None, help="learned: optimizer steps per window")
    p.add_argument("--budget-s", type=_positive_float, default=None, metavar="S", help="time budget for learning")
    p.add_argument("--workers", type=_positive_int, default=None, help="solver processes (default: all cores)")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice (default 0)")
    p.add_argument("--rtol", type=_positive_float, default=None, help="fold check tolerance (default 1e-4)")
    p.add_argument("--cluster", default=None, metavar="WHERE",
                   help="where units are solved: local (default), auto (Ray: running cluster or a local instance; "
                        "pip install 'permsparse[ray]') or ray://HOST:PORT")
    p.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                   help="keep every solved unit in DIR and reuse it when the run is started again (resume)")
    p.add_argument("--check", choices=CHECKS, default=None,
                   help="run the model whole (onnxruntime) or block by block (PyTorch, for models too big to hold "
                        "twice) for the fold check and calibration; default auto (blocks above ~1 GB of fp32 weights)")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="torch device of the torch stages (block calibration, Hessians, SparseGPT, block tuning, "
                        "permutation learners, recovery): cpu (default), cuda, or auto (cuda when torch sees one); "
                        "onnxruntime steps stay on the CPU")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="measure plain N:M vs the result on held-out data; write a Markdown report with plots")
    p.add_argument("--recipe", type=Path, default=None, metavar="FILE",
                   help="replay a recipe.json written by an earlier run (same options and permutations)")
    _shapes(p, "shapes for analysis and checks")
    from permsparse.recover.cli import add_recover_options

    add_recover_options(p, verb=False)
    p.set_defaults(func=verbs._cmd_optimize)

    p = sub.add_parser("inspect", help="weights, closures, fold status and N:M validity")
    _common(p)
    p.add_argument("model", type=Path)
    p.add_argument("--pattern", type=_pattern, default=None, help="N:M pattern to check (default 2:4)")
    _shapes(p, "shapes for the analysis")
    p.set_defaults(func=verbs._cmd_inspect)

    p = sub.add_parser("build", help="build a TensorRT / TensorRT-RTX engine with sparse weights",
                       description="Parse an ONNX model with the installed TensorRT (tensorrt preferred, else "
                       "tensorrt_rtx), enable sparse weights, and report which layers got (or can get) sparse tactics.")
    _common(p)
    p.add_argument("model", type=Path, help="ONNX model (e.g. the output of `permsparse optimize`)")
    p.add_argument("-o", "--output", type=Path, default=None, help="engine file (default: MODEL with .plan)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="engine precision (strongly typed TensorRT: converts the ONNX; TensorRT 8/10: builder flag)")
    p.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="same as --precision fp16")
    p.add_argument("--sparse", dest="sparse", action="store_true", default=True, help="enable sparse weights (default)")
    p.add_argument("--sparsity", dest="sparse", choices=("enable", "disable"), default=argparse.SUPPRESS,
                   type=str, help="trtexec spelling of --sparse/--no-sparse")
    p.add_argument("--no-sparse", dest="sparse", action="store_false", help="build a dense engine")
    p.add_argument("--workspace", type=_positive_float, default=None, metavar="GB", help="workspace limit in GiB")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="FILE", help="timing cache to read and update")
    p.add_argument("--precision-mode", choices=PRECISION_MODES, default="auto",
                   help="how to get fp16/bf16: builder flags (TensorRT 8/10) or ONNX conversion (default: auto)")
    p.add_argument("--keep-fp32", nargs="+", default=None, metavar="OP",
                   help="op types kept in fp32 by the conversion (default: norms, softmax, reductions, Pow, Sqrt)")
    p.add_argument("--trt-log", type=Path, default=None, metavar="FILE", help="write TensorRT's verbose log there")
    _shapes(p, "optimization profile")
    p.set_defaults(func=verbs._cmd_build)

    p = sub.add_parser("bench", help="latency of the sparse model vs the dense one (table + bar plot)")
    _common(p)
    p.add_argument("model", type=Path, help="sparse ONNX model (or a .plan for --backend tensorrt)")
    p.add_argument("--dense", type=Path, required=True, help="the dense ONNX model (or .plan) to compare with")
    p.add_argument("--backend", choices=BACKENDS, default="ort",
                   help="ort: CPU (default); torch: the whole model on the torch evaluator, 2:4 kernels on CUDA; "
                   "tensorrt: engines (GPU)")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="torch backend: auto (default: cuda when available), cpu (dense kernels) or cuda")
    p.add_argument("--iters", type=_positive_int, default=50, help="timed samples (default 50)")
    p.add_argument("--warmup", type=_nonneg_int, default=10, help="untimed warm-up calls (default 10)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="torch/tensorrt precision (default fp16); ort runs the models as stored")
    p.add_argument("--sparse-method", choices=SPARSE_METHODS, default=None, help="torch backend's 2:4 kernel")
    p.add_argument("--threads", type=_positive_int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--plot", type=Path, default=None, help="bar plot PNG (default: beside the sparse model)")
    p.add_argument("--no-plot", action="store_true", help="do not write a plot")
    p.add_argument("--save-json", type=Path, default=None, metavar="FILE", help="also write the results to FILE")
    _shapes(p, "shapes to time (the OPT shape)")
    p.set_defaults(func=verbs._cmd_bench)

    p = sub.add_parser("export", help="export a built-in or local Hugging Face model to ONNX",
                       description="minilm: the real all-MiniLM-L6-v2 (offline); vit, llama: seeded test models; "
                       "hf: a local Hugging Face checkpoint (--hf-dir); tiny-<family> (tiny-gemma3, tiny-qwen2, tiny-phi3, tiny-gpt2, ...): "
                       "seeded 2-layer models of each family built from transformers configs. Weights over ~1.8 GB go "
                       "to OUT.onnx.data.")
    _common(p)
    p.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help="which model: " + ", ".join(MODEL_NAMES))
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx", help="ONNX file to write")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help="torch.onnx exporter (default dynamo)")
    p.add_argument("--size", choices=MODEL_SIZES, default="tiny", help="preset size for vit/llama (default tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in models' weights (default 0)")
    p.add_argument("--hf-dir", metavar="DIR", default=None,
                   help="local Hugging Face checkpoint or folder with one .gguf (model hf)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="weights' type of an hf export (default float32)")
    p.set_defaults(func=verbs._cmd_export)

    from permsparse.recover.cli import add_parser as add_recover

    add_recover(sub, _common, verbs._cmd_recover)
    return parser


# ------------------------------------------------------------------------------------------------- main


#: Loggers whose INFO lines are shown by default on a terminal (not under -q/--json): what a run is doing during its
#: long steps, so no stretch of a run is silent (stage starts, the report's evaluation, export). -v shows every INFO line.
STATUS_LOGGERS = ("permsparse.pipeline.run", "permsparse.api", "permsparse.cli_verbs")


class _StatusFilter(logging.Filter):
    """At the default verbosity: warnings and errors, plus the start of each step from :data:`STATUS_LOGGERS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return record.levelno == logging.INFO and record.name in STATUS_LOGGERS and \
            " done in " not in record.getMessage()


#: What each stage of ``optimize`` does, for its status line.
STAGE_WORDS = {
    "load": "reading and checking the model",
    "probe": "shapes of every tensor",
    "analyze": "weights and permutation closures",
    "calibrate": "activation norms on calibration data",
    "learn": "solving the permutations",
    "block-wise": "calibration, permutations, SparseGPT and tuning, block by block",
    "fold": "folding the permutations into the weights; fold check: the permuted dense model against the input",
    "mask+save": "N:M masks, the independent N:M check, writing",
    "recover": "training the kept weights against the dense model, masks frozen",
}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name in STATUS_LOGGERS:
            msg = record.getMessage()
            stage = msg[:-4] if msg.endswith(" ...") else None
            if stage in STAGE_WORDS:
                msg = f"{stage}: {STAGE_WORDS[stage]} ..."
            return f"permsparse: {msg}"
        return super().format(record)


def _setup_logging(args: argparse.Namespace) -> None:
    verbose = getattr(args, "verbose", 0) or 0
    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    level = logging.ERROR if quiet else logging.WARNING - 10 * min(verbose, 2)
    # status lines only for a person watching a terminal: piped or captured stderr keeps the one-line error promise
    status = not quiet and verbose == 0 and sys.stderr.isatty()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO if status else level)
    if status:
        handler.addFilter(_StatusFilter())
    handler.setFormatter(_Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    for name in STATUS_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if status else logging.NOTSET)
    root.setLevel(min(level, logging.DEBUG if getattr(args, "log_file", None) else level))
    log_file = getattr(args, "log_file", None)
    if log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


def _private_torch_cache() -> None:
    """torch creates ``$TMPDIR/torchinductor_<user>`` (export, Adam) and leaves it behind; point it at a folder of
    this process, removed at exit and, if the process is killed, swept by the next run as a stale solver folder
    (its name carries the pid). A cache folder the user chose is kept."""
    import os

    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    import atexit
    import shutil
    import tempfile

    from permsparse.optimizer.solve import TMP_PREFIX

    path = os.path.join(tempfile.gettempdir(), f"{TMP_PREFIX}{os.getpid()}-torchinductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    atexit.register(shutil.rmtree, path, True)


def _ignore_signals() -> None:
    """After an interrupt was handled (cleanup done, message printed), let no later SIGINT/SIGTERM turn the exit into
    a death by signal: the process exits 130 as documented (only from the main thread, where handlers can be set)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _exit_interrupted() -> None:
    """Exit 130 now, after the exit handlers ran. With a normal exit, a run interrupted during the probe step (while
    ``import torch`` runs) was seen to die by SIGINT after printing its message (status -2 instead of 130, 3 of 7
    tries; the mechanism inside the interpreter's shutdown was not pinned down); the documented status is 130."""
    import atexit
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(130)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    as_program = argv is None  # the process is this command: after an interrupt, later signals are ignored
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_split_shape_values(argv))
    except _ArgumentError as exc:
        verb = next((a for a in argv if a in _verbs(parser)), None)
        fake = argparse.Namespace(command=verb)
        prog = f"{exc.prog} {verb}" if verb and exc.prog == parser.prog else exc.prog
        return _fail(fake, "--json" in argv, f"{exc} (see `{prog} --help`)", UsageError.exit_code)
    if getattr(args, "sparse", None) in ("enable", "disable"):
        args.sparse = args.sparse == "enable"
    as_json = bool(getattr(args, "json", False))
    try:
        _setup_logging(args)
    except OSError as exc:
        from permsparse.errors import os_reason

        return _fail(args, as_json, f"--log-file {args.log_file}: {os_reason(exc)}; choose a writable file", 2)
    if as_json or getattr(args, "quiet", False):
        args.quiet = True
    _private_torch_cache()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    func: Callable[[argparse.Namespace], verbs.Outcome] = args.func
    try:
        outcome = func(args)
    except KeyboardInterrupt:
        if as_program:
            _ignore_signals()
        code = _fail(args, as_json, "interrupted: stopped, temporary files removed, nothing written", 130)
        if as_program:
            _exit_interrupted()
        return code
    except PermsparseError as exc:
        if exc.exit_code == 130 and as_program:
            _ignore_signals()
        if getattr(args, "verbose", 0) >= 2:
            log.exception("failure")
        code = _fail(args, as_json, str(exc), exc.exit_code)
        if exc.exit_code == 130 and as_program:
            _exit_interrupted()
        return code
    except MemoryError:
        return _fail(args, as_json, "out of memory; try fewer --calib-samples or --workers 1", 1)
    except OSError as exc:
        if getattr(args, "verbose", 0) >= 2:
            log.exception("failure")
        from permsparse.errors import os_reason

        reason, name = os_reason(exc), getattr(exc, "filename", None)
        if name and reason != exc.strerror:  # a file where a folder is needed: say which
            return _fail(args, as_json, f"cannot write {name}: {reason}; choose another path", 1)
        return _fail(args, as_json, f"{reason}{f' ({name})' if name else ''}", 1)
    except Exception as exc:  # a bug: still one line, the traceback with -vv
        if getattr(args, "verbose", 0) >= 2:
            log.exception("internal error")
        return _fail(args, as_json, f"internal error ({type(exc).__name__}: {exc}); run with -vv for the traceback "
                     "and please report it", 1)
    finally:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, previous)
    if as_json:
        print(json.dumps({"command": args.command, "ok": True, **outcome.data}, default=_jsonable))
    else:
        print(outcome.text)
    return 0


def _verbs(parser: argparse.ArgumentParser) -> list[str]:
    return [name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]


_SHAPE_FLAGS = ("--shapes", "--input-shapes")
_SHAPE_VALUE = re.compile(r"^[^-\s].*:[\[\]\d\sxX,;]+$")


def _split_shape_values(argv: list[str]) -> list[str]:
    """``--shapes a:1x8 model.onnx`` would read the model as a shape (nargs='+'): pass each value that looks like a
    shape as its own ``--shapes=VALUE`` so the first one that does not (the model) stays a positional argument."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out += argv[i:]
            break
        if a in _SHAPE_FLAGS and i + 1 < len(argv):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            while i < len(argv) and _SHAPE_VALUE.match(argv[i]):
                out.append(f"{a}={argv[i]}")
                i += 1
            continue
        out.append(a)
        i += 1
    return out


def _fail(args: argparse.Namespace, as_json: bool, message: str, code: int) -> int:
    message = " ".join(message.split("\n")) if message else "failed"
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"command": getattr(args, "command", None), "ok": False, "error": message,
                          "exit_code": code}))
    return code


def _jsonable(x: Any) -> Any:
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(x)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["UsageError", "build_parser", "main"]
