"""Model-level quality metrics: how far a sparse model's outputs drift from the dense model's.

- :func:`output_drift`: cosine similarity (mean over rows of the last axis) and relative Frobenius error.
- :func:`mean_pooled_cosine`: cosine of mean-pooled sentence embeddings (as sentence-transformers pools MiniLM).
- :func:`causal_lm_cross_entropy`: next-token cross-entropy of a decoder's logits (perplexity = exp(CE));
  :func:`perplexity`: one decoder's perplexity over feeds.
- :func:`evaluate_drift`: runs a dense and a sparse ONNX model over the same feeds with onnxruntime (one session at a
  time; the dense outputs wait on disk in a temp folder) and returns all of the above.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from permsparse.errors import PermsparseError
from permsparse.ir.header import load_structure
from permsparse.ir.session import Session

logger = logging.getLogger(__name__)

_EPS = 1e-12


def _rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        a = a.reshape(1, 1)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        if a.ndim >= 2 and a.shape[: m.ndim] == m.shape and a.ndim == m.ndim + 1:
            return a[m]
    return a.reshape(-1, a.shape[-1])


def _row_cosines(d: np.ndarray, s: np.ndarray) -> np.ndarray:
    nd = np.linalg.norm(d, axis=-1)
    ns = np.linalg.norm(s, axis=-1)
    dot = np.einsum("ij,ij->i", d, s)
    cos = dot / np.maximum(nd * ns, _EPS)
    both_zero = (nd <= _EPS) & (ns <= _EPS)
    return np.where(both_zero, 1.0, cos)


def _drift_sums(dense: np.ndarray, sparse: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, int, float, float]:
    """(sum of row cosines, rows, ||S - D||^2, ||D||^2)."""
    if np.shape(dense) != np.shape(sparse):
        raise PermsparseError(f"dense and sparse outputs differ in shape: {np.shape(dense)} vs {np.shape(sparse)}")
    d, s = _rows(dense, mask), _rows(sparse, mask)
    return float(_row_cosines(d, s).sum()), int(d.shape[0]), float(((s - d) ** 2).sum()), float((d**2).sum())


def _finish_drift(cos_sum: float, rows: int, diff_sq: float, ref_sq: float) -> dict[str, float]:
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return {"cosine": cos_sum / max(rows, 1), "rel_error": rel}


def output_drift(dense_outputs: np.ndarray, sparse_outputs: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Drift of one output: ``{"cosine": mean over rows of the last axis, "rel_error": ||S - D||_F / ||D||_F}``.

    ``mask`` (e.g. an attention mask ``[B, S]`` for outputs ``[B, S, H]``) leaves out rows where it is 0.
    Rows that are zero in both count as cosine 1.
    """
    return _finish_drift(*_drift_sums(dense_outputs, sparse_outputs, mask))


def _mean_pool(hidden: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
    h = np.asarray(hidden, dtype=np.float64)
    if h.ndim != 3:
        raise PermsparseError(f"mean pooling needs hidden states [B, S, H], got {h.shape}")
    m = np.ones(h.shape[:2]) if attention_mask is None else np.asarray(attention_mask, dtype=np.float64)
    if m.shape != h.shape[:2]:
        raise PermsparseError(f"attention mask {m.shape} does not match hidden states {h.shape[:2]}")
    return (h * m[..., None]).sum(axis=1) / np.maximum(m.sum(axis=1, keepdims=True), 1e-9)


def _pooled_sums(dense_hidden: np.ndarray, sparse_hidden: np.ndarray, attention_mask: np.ndarray | None) -> tuple[float, int]:
    d, s = _mean_pool(dense_hidden, attention_mask), _mean_pool(sparse_hidden, attention_mask)
    return float(_row_cosines(d, s).sum()), int(d.shape[0])


def mean_pooled_cosine(dense_hidden: np.ndarray, sparse_hidden: np.ndarray, attention_mask: np.ndarray | None = None) -> float:
    """Mean over sentences of the cosine between mask-weighted mean-pooled hidden states ``[B, S, H]`` (the
    sentence-transformers pooling of all-MiniLM-L6-v2, before its L2 normalization, which cosine ignores)."""
    total, n = _pooled_sums(dense_hidden, sparse_hidden, attention_mask)
    return total / max(n, 1)


def _ce_sums(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, number of predicted tokens)."""
    lg = np.asarray(logits)
    ids = np.asarray(input_ids).astype(np.int64)
    if lg.ndim != 3 or lg.shape[:2] != ids.shape:
        raise PermsparseError(f"logits {lg.shape} must be [B, S, V] matching input_ids {ids.shape}")
    v = lg.shape[-1]
    if ids.size and (int(ids.max()) >= v or int(ids.min()) < 0):
        raise PermsparseError(f"input_ids hold ids outside the logits' vocabulary of {v}")
    mask = np.ones(ids.shape, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    total, count = 0.0, 0
    for b in range(ids.shape[0]):  # one row at a time keeps the float64 log-softmax small
        keep = mask[b, :-1] & mask[b, 1:]  # predict token t+1 from a real token t
        if not keep.any():
            continue
        x = lg[b, :-1][keep].astype(np.float64)
        tgt = ids[b, 1:][keep]
        mx = x.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(x - mx).sum(axis=-1)) + mx[:, 0]
        total += float((lse - x[np.arange(x.shape[0]), tgt]).sum())
        count += int(keep.sum())
    return total, count


def causal_lm_cross_entropy(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> float:
    """Mean next-token cross-entropy (nats) of ``logits [B, S, V]`` on ``input_ids [B, S]``: position ``t`` predicts
    token ``t + 1``; pairs touching a padded position (``attention_mask`` 0) are skipped. Perplexity = ``exp(CE)``."""
    total, count = _ce_sums(logits, input_ids, attention_mask)
    if count == 0:
        raise PermsparseError("no next-token pairs to score: sequences need at least 2 unpadded tokens")
    return total / count


def perplexity(
    model: str | os.PathLike | onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    logits: str | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """Next-token perplexity of one decoder over ``feeds`` (as :func:`evaluate_drift` scores it, without running a
    second model): ``{"ce", "ppl", "tokens"}``. ``logits``: the output to score (default: the first whose name holds
    ``logits``). Feeds built by :func:`permsparse.data.feeds.make_feeds` are tokenized as the model's tokenizer says
    (BOS-led windows when it adds a BOS), so the first scored pair predicts the first text token from the BOS."""
    sess = _session(model)
    try:
        name = logits or next((n for n in sess.output_names if "logits" in n), None)
        if name is None:
            raise PermsparseError(f"the model has no logits output (outputs: {list(sess.output_names)[:5]})")
        total, count = 0.0, 0
        for feed, (out,) in _run_all(sess, feeds, [name], "perplexity", progress):
            m = feed.get("attention_mask")
            t, c = _ce_sums(out, feed["input_ids"], None if m is None or np.ndim(m) != 2 else np.asarray(m))
            total += t
            count += c
    finally:
        sess.close()
    if count == 0:
        raise PermsparseError("no next-token pairs to score: give evaluation windows of at least 2 tokens")
    ce = total / count
    return {"ce": ce, "ppl": math.exp(min(ce, 700.0)), "tokens": count}


def _session(model: str | os.PathLike | onnx.ModelProto) -> Session:
    return Session(model)


def _run_all(session: Any, feeds: Sequence[Mapping[str, np.ndarray]], names: list[str], desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    for feed in tqdm(feeds, desc=desc, unit="batch", disable=(None if progress is None else not progress)):
        out = session.run(feed, names)
        yield feed, [out[n] for n in names]


def evaluate_drift(
    dense_model_path: str | os.PathLike | onnx.ModelProto,
    sparse_model_path: str | os.PathLike | onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    output_names: list[str] | None = None,
    lm: bool | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run both models over ``feeds`` (a re-iterable sequence) and compare their outputs.

    Args:
        output_names: outputs to compare (default: all outputs of the dense model; both models must have them).
        lm: score next-token CE/perplexity on a ``logits`` output (default: when the model looks like a decoder).

    Returns:
        ``{"batches", "examples", "outputs": {name: {"cosine", "rel_error"}}, "cosine", "rel_error"`` (of the first
        compared output), and when they apply ``"pooled_cosine"`` (first 3-D non-logits output, mean pooling with the
        feed's attention mask) and ``"ce_dense", "ce_sparse", "ppl_dense", "ppl_sparse", "tokens"``. Padded positions
        (feed ``attention_mask`` 0) are left out of every metric.
    """
    from permsparse.data.kinds import model_kind

    if not isinstance(feeds, Sequence):
        feeds = list(feeds)
    if not feeds:
        raise PermsparseError("no evaluation feeds; give a non-empty data source")
    dense_sess = _session(dense_model_path)
    names = output_names or list(dense_sess.output_names)
    missing = [n for n in names if n not in set(dense_sess.output_names)]
    if missing:
        raise PermsparseError(f"the dense model has no outputs {missing}")
    if lm is None:
        header = dense_model_path if isinstance(dense_model_path, onnx.ModelProto) else load_structure(dense_model_path)
        try:
            lm = model_kind(header) == "lm"
        except PermsparseError:
            lm = False
        del header
    logits_name = next((n for n in names if "logits" in n), None) if lm else None
    pooled_name: str | None = None
    drift = {n: [0.0, 0, 0.0, 0.0] for n in names}
    pooled = [0.0, 0]
    ce = {"dense": [0.0, 0], "sparse": [0.0, 0]}
    examples = 0

    def mask_of(feed: Mapping[str, np.ndarray]) -> np.ndarray | None:
        m = feed.get("attention_mask")
        return None if m is None or np.asarray(m).ndim != 2 else np.asarray(m)

    with tempfile.TemporaryDirectory(prefix="permsparse-drift-") as tmp:
        for i, (feed, outs) in enumerate(_run_all(dense_sess, feeds, names, "dense", progress)):
            for j, out in enumerate(outs):
                np.save(os.path.join(tmp, f"{i}_{j}.npy"), out)
            if logits_name is not None and "input_ids" in feed:
                t, c = _ce_sums(outs[names.index(logits_name)], feed["input_ids"], mask_of(feed))
                ce["dense"][0] += t
                ce["dense"][1] += c
            examples += int(np.shape(outs[0])[0]) if np.ndim(outs[0]) else 1
        dense_sess.close()
        sparse_sess = _session(sparse_model_path)
        absent = [n for n in names if n not in set(sparse_sess.output_names)]
        if absent:
            raise PermsparseError(f"the sparse model lacks outputs {absent} that the dense model has")
        for i, (feed, outs) in enumerate(_run_all(sparse_sess, feeds, names, "sparse", progress)):
            mask = mask_of(feed)
            for j, (name, out) in enumerate(zip(names, outs)):
                dense = np.load(os.path.join(tmp, f"{i}_{j}.npy"))
                sums = _drift_sums(dense, out, mask)
                acc = drift[name]
                for k in range(4):
                    acc[k] += sums[k]
                if name != logits_name and np.ndim(out) == 3 and (pooled_name is None or pooled_name == name):
                    if mask is None or mask.shape == np.shape(out)[:2]:
                        pooled_name = name
                        t, c = _pooled_sums(dense, out, mask)
                        pooled[0] += t
                        pooled[1] += c
                if name == logits_name and "input_ids" in feed:
                    t, c = _ce_sums(out, feed["input_ids"], mask)
                    ce["sparse"][0] += t
                    ce["sparse"][1] += c
                del dense
        sparse_sess.close()
    per_output = {n: _finish_drift(*drift[n]) for n in names}
    result: dict[str, Any] = {
        "batches": len(feeds),
        "examples": examples,
        "outputs": per_output,
        "cosine": per_output[names[0]]["cosine"],
        "rel_error": per_output[names[0]]["rel_error"],
    }
    if pooled_name is not None and pooled[1]:
        result["pooled_cosine"] = pooled[0] / pooled[1]
        result["pooled_output"] = pooled_name
    if logits_name is not None and ce["dense"][1]:
        for which in ("dense", "sparse"):
            val = ce[which][0] / max(ce[which][1], 1)
            result[f"ce_{which}"] = val
            result[f"ppl_{which}"] = math.exp(min(val, 700.0))
        result["tokens"] = ce["dense"][1]
    logger.info(
        "drift: cosine %.6f, rel_error %.4g%s", result["cosine"], result["rel_error"],
        f", ppl {result['ppl_dense']:.3f} -> {result['ppl_sparse']:.3f}" if "ppl_dense" in result else "",
    )
    return result
