"""Calibration: per-channel activation statistics of named tensors, collected with onnxruntime on CPU.

:func:`collect_activation_stats` runs a *copy* of the model in which the requested intermediate tensors are extra
graph outputs (the input model object and file are never modified), streams over the feed batches, and keeps, per
tensor, only bounded state:

- the per-channel (last axis) sum of squares over all tokens, in ``float64``, and the token count;
- a uniform reservoir sample (Algorithm R) of at most ``max_rows`` activation rows, for output-aware objectives.

A tensor ``[..., K]`` with any leading dims is treated as ``prod(leading)`` rows of ``K`` channels. When a feed has a
2-D ``attention_mask [B, S]`` (whether or not the model itself reads it) and a tensor's leading dims are exactly
``[B, S]``, padded positions (mask 0) are left out (``CalibrationConfig.mask_padding``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx

from permsparse.errors import PermsparseError
from permsparse.ir.header import load_structure
from permsparse.ir.session import Session

logger = logging.getLogger(__name__)

_PROTO_LIMIT = 2_000_000_000  # protobuf's 2 GiB limit, with a margin


@dataclass(frozen=True)
class CalibrationConfig:
    """How much calibration data to use. ``None`` means the default (see :meth:`resolved`).

    Attributes:
        samples: most examples (rows of the feeds' batch axis) to run; default 128. Feeds beyond it are not run.
        batch_size: examples per batch, for feed builders (:func:`permsparse.data.feeds.make_feeds`); default 8.
        seq_len: tokens per text example, for feed builders; default 128.
        max_rows: size of each tensor's reservoir sample of activation rows; default 512; 0 keeps no sample.
        seed: seed of the reservoir sampling (and of feed builders that sample); default 0.
        mask_padding: leave padded tokens out of the statistics when the feed has an ``attention_mask``; default True.
        progress: show a tqdm progress bar; default: only on a terminal.
    """

    samples: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    max_rows: int | None = None
    seed: int | None = None
    mask_padding: bool | None = None
    progress: bool | None = None

    def resolved(self) -> CalibrationConfig:
        """A copy with every ``None`` replaced by its default; validates the values."""
        cfg = replace(
            self,
            samples=128 if self.samples is None else int(self.samples),
            batch_size=8 if self.batch_size is None else int(self.batch_size),
            seq_len=128 if self.seq_len is None else int(self.seq_len),
            max_rows=512 if self.max_rows is None else int(self.max_rows),
            seed=0 if self.seed is None else int(self.seed),
            mask_padding=True if self.mask_padding is None else bool(self.mask_padding),
            progress=self.progress,
        )
        for field_name in ("samples", "batch_size", "seq_len"):
            if getattr(cfg, field_name) <= 0:
                raise PermsparseError(f"calibration {field_name} must be a positive integer, got {getattr(cfg, field_name)}")
        if cfg.max_rows < 0:
            raise PermsparseError(f"calibration max_rows must be >= 0 (0 keeps no activation sample), got {cfg.max_rows}")
        return cfg


@dataclass(frozen=True)
class ActivationStats:
    """Statistics of one tensor's last axis over all calibration tokens.

    Attributes:
        name: the tensor name.
        sum_sq: ``float64 [K]``, sum over tokens of ``x_k ** 2``.
        count: number of tokens (rows) accumulated.
        sample: ``float32 [r, K]``, ``r = min(count, max_rows)``, a uniform sample of rows (``None`` when ``max_rows=0``).
    """

    name: str
    sum_sq: np.ndarray
    count: int
    sample: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(self.sum_sq.shape[0])

    @property
    def norm(self) -> np.ndarray:
        """``||X_k||_2`` over all tokens, ``float64 [K]`` (the Wanda/RIA activation factor)."""
        return np.sqrt(self.sum_sq)

    @property
    def rms(self) -> np.ndarray:
        """Root mean square per channel, ``float64 [K]``."""
        return np.sqrt(self.sum_sq / max(self.count, 1))


class _Accumulator:
    """Streaming sum of squares + reservoir sample for one tensor."""

    def __init__(self, name: str, max_rows: int, rng: np.random.Generator) -> None:
        self.name = name
        self.max_rows = max_rows
        self.rng = rng
        self.sum_sq: np.ndarray | None = None
        self.count = 0
        self.reservoir: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> None:
        if rows.ndim != 2:
            raise AssertionError(rows.shape)
        k = rows.shape[1]
        if self.sum_sq is None:
            self.sum_sq = np.zeros(k, dtype=np.float64)
        elif self.sum_sq.shape[0] != k:
            raise PermsparseError(
                f"tensor {self.name!r} changed its last-axis size between batches ({self.sum_sq.shape[0]} -> {k}); "
                "calibration needs a fixed channel count"
            )
        r = rows.shape[0]
        if r == 0:
            return
        r64 = rows.astype(np.float64, copy=False)
        self.sum_sq += np.einsum("ij,ij->j", r64, r64)
        if self.max_rows > 0:
            self._sample(rows)
        self.count += r

    def _sample(self, rows: np.ndarray) -> None:
        r, k = rows.shape
        if self.reservoir is None:
            self.reservoir = np.empty((self.max_rows, k), dtype=np.float32)
        start = self.count
        fill = max(0, min(self.max_rows - start, r))
        if fill:
            self.reservoir[start : start + fill] = rows[:fill]
        if fill < r:
            # Algorithm R, vectorized: row with global index j replaces slot u ~ U{0..j} when u < max_rows;
            # numpy's fancy assignment applies duplicates in order, as the sequential algorithm would.
            j = np.arange(start + fill, start + r, dtype=np.int64)
            u = (self.rng.random(j.shape[0]) * (j + 1)).astype(np.int64)
            hit = u < self.max_rows
            if hit.any():
                self.reservoir[u[hit]] = rows[fill:][hit]

    def result(self) -> ActivationStats:
        if self.sum_sq is None:
            raise PermsparseError(f"no calibration data reached tensor {self.name!r}; the feeds were empty")
        sample = None
        if self.reservoir is not None:
            sample = self.reservoir[: min(self.count, self.max_rows)].copy()
        return ActivationStats(self.name, self.sum_sq.copy(), self.count, sample)


def _graph_names(model: onnx.ModelProto) -> tuple[set[str], set[str], set[str]]:
    inits = {t.name for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input if i.name not in inits}
    produced = {o for n in model.graph.node for o in n.output if o}
    for n in model.graph.node:
        if n.op_type == "Constant":
            inits.update(n.output)
    return inputs, produced, inits


def _batch_size(feed: Mapping[str, np.ndarray]) -> int:
    for value in feed.values():
        arr = np.asarray(value)
        if arr.ndim >= 1:
            return int(arr.shape[0])
    return 1


def _rows(name: str, value: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 0:
        raise PermsparseError(f"tensor {name!r} is a scalar; calibration needs tensors shaped [..., K]")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    if mask is not None and arr.ndim == 3 and arr.shape[:2] == mask.shape:
        return arr[mask.astype(bool)]
    return arr.reshape(-1, arr.shape[-1])


def collect_activation_stats(
    model: onnx.ModelProto | str | os.PathLike,
    tensor_names: list[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    config: CalibrationConfig | None = None,
) -> dict[str, ActivationStats]:
    """Per-channel statistics of ``tensor_names`` (graph inputs or intermediate tensors) over ``feeds``.

    Args:
        model: an ONNX model or its path (never modified).
        tensor_names: tensors to observe, each shaped ``[..., K]``; typically the A inputs of prunable MatMuls.
        feeds: batches, each a dict from graph-input name to array (extra keys such as an ``attention_mask`` the
            model does not read are allowed and used for padding masks only). Consumed once, streaming.
        config: :class:`CalibrationConfig`; ``samples`` caps the examples run.

    Returns:
        ``{name: ActivationStats}`` in the order of ``tensor_names``.
    """
    from tqdm.auto import tqdm

    cfg = (config or CalibrationConfig()).resolved()
    names = list(dict.fromkeys(tensor_names))
    if not names:
        return {}
    header = load_structure(model) if isinstance(model, (str, os.PathLike)) else model
    graph_inputs, produced, constants = _graph_names(header)
    missing = [n for n in names if n not in graph_inputs and n not in produced]
    if missing:
        consts = [n for n in missing if n in constants]
        if consts:
            raise PermsparseError(f"tensors {consts[:5]} are constants, not activations; calibrate the tensors the weights multiply")
        raise PermsparseError(
            f"tensors {missing[:5]} are neither graph inputs nor produced by a node of the main graph; "
            "check the names (did the model change after analysis?)"
        )
    from_inputs = [n for n in names if n in graph_inputs]
    from_outputs = [n for n in names if n not in graph_inputs]
    input_order = [i.name for i in header.graph.input if i.name in graph_inputs]
    del header

    rng = np.random.default_rng(cfg.seed)
    acc = {n: _Accumulator(n, cfg.max_rows, rng) for n in names}
    total_examples = 0
    session = Session(model, from_outputs) if from_outputs else None
    session_inputs = session.input_names if session is not None else input_order
    bar = tqdm(desc="calibration", unit="ex", total=cfg.samples, disable=(None if cfg.progress is None else not cfg.progress))
    try:
        for feed in feeds:
            if total_examples >= cfg.samples:
                break
            b = _batch_size(feed)
            take = min(b, cfg.samples - total_examples)
            if take < b:
                feed = {k: (np.asarray(v)[:take] if np.asarray(v).ndim >= 1 else v) for k, v in feed.items()}
            absent = [n for n in session_inputs if n not in feed]
            if absent:
                raise PermsparseError(
                    f"calibration feed lacks model inputs {absent}; build feeds with permsparse.data.feeds.make_feeds"
                )
            mask = None
            if cfg.mask_padding and "attention_mask" in feed:
                m = np.asarray(feed["attention_mask"])
                mask = m if m.ndim == 2 else None
            values: dict[str, np.ndarray] = {n: np.asarray(feed[n]) for n in from_inputs}
            if session is not None:
                run_feed = {n: np.asarray(feed[n]) for n in session_inputs}
                values.update(session.run(run_feed, from_outputs))
            for n in names:
                acc[n].add(_rows(n, values[n], mask))
            del values
            total_examples += take
            bar.update(take)
    finally:
        bar.close()
        if session is not None:
            session.close()
    if total_examples == 0:
        raise PermsparseError("calibration got no data: the feeds were empty; give a non-empty --calib source")
    logger.info("calibration: %d examples, %d tensors, %d tokens", total_examples, len(names), acc[names[0]].count)
    return {n: acc[n].result() for n in names}
