"""Recovery text: training batches and a disjoint early-stopping slice, from one function (:func:`recovery_data`).

Source: ``--calib FILE|DIR`` (.txt one text per line, .json, .jsonl, a folder of .txt), else the ``train`` split of
the multi-domain corpus (:func:`permsparse.data.corpus.mix`: encyclopedia, news, film, manuals, code comments; never
the out-of-domain held-out domain, never calibration or held-out items), else the built-in Wikipedia calibration split. The texts are split once, by a seeded shuffle, into the
early-stopping slice (the first ``stop_samples`` sequences' worth of texts) and the training texts; the built-in
held-out split is never read here (it stays for evaluation).

Encoder training batches hold texts of similar length (sorted within runs of :data:`BUCKET_BATCHES` batches; the loop
draws batches in a shuffled order): padded to their longest text, batches of mixed lengths were half padding, and
all-MiniLM-L6-v2 makes 30 % more steps in the same minutes without them (bench/results/recovery-minilm.md).

Invariant: no text of the early-stopping slice is in the training batches (the split is by text, before
tokenizing), and the data hash names exactly the token ids trained on and stopped on.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from permsparse.errors import PermsparseError

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
#: encoder training batches are padded to a multiple of this many tokens (see :func:`_feeds`)
PAD_MULTIPLE = 8
#: encoder training texts are grouped into batches of similar length within runs of this many batches
BUCKET_BATCHES = 64


@dataclass
class RecoveryData:
    train: list[Feed]  # one feed per step (cycled)
    stop: list[Feed]  # early-stopping slice, never trained on
    kind: str  # "lm" (decoder) or "text" (encoder)
    source: str
    tokens: int  # tokens in ``train``
    sha256: str  # hash of the ids of train and stop
    real_tokens: bool = True  # False: byte ids without a tokenizer (structure tests; perplexity means nothing)


def _texts(calib: str | None, seed: int) -> tuple[list[str], str]:
    from permsparse.data.text import builtin_texts, read_texts

    if calib is None:
        try:
            from permsparse.data import corpus
        except ImportError:  # pragma: no cover - an older data layer: Wikipedia only
            corpus = None
        if corpus is not None:
            texts = corpus.mix("train", seed=seed)
            if texts:
                return texts, "multi-domain train split (" + ", ".join(
                    d for d in corpus.DEFAULT_MIX if corpus.available(d)) + ")"
    if calib is None or str(calib) in ("builtin", "wiki"):
        quiet = logging.getLogger("permsparse.data.text")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # asking for the whole split is not a shortfall
        try:
            texts = builtin_texts(10**7, "calib", seed)  # the whole calibration split, shuffled
        finally:
            quiet.setLevel(level)
        return texts, "built-in Wikipedia calibration split"
    path = Path(calib)
    if not path.exists():
        raise PermsparseError(f"--calib {str(path)!r} does not exist; give a .txt/.jsonl file or a folder of .txt")
    texts = [t for t in read_texts(path) if t.strip()] if path.is_dir() or path.stat().st_size else []
    if not texts:
        raise PermsparseError(f"--calib {str(path)!r} holds no text; give a non-empty .txt/.jsonl file or folder")
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.permutation(len(texts))], str(path)


def _bucketed(texts: list[str], tok, batch_size: int, seq_len: int) -> list[str]:
    """The texts reordered so each run of ``BUCKET_BATCHES`` batches holds the same texts, sorted by token length:
    a batch is padded to its longest text, and the mixed lengths of the built-in mix (film snippets of ~30 tokens
    beside news passages cut at 128) left about half of each padded batch as padding. Every text is still trained on
    as often; the loop draws the batches in a shuffled order. ``tok``: a loaded tokenizer."""
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=seq_len)["input_ids"]]
    run = batch_size * BUCKET_BATCHES
    order: list[int] = []
    for start in range(0, len(texts), run):
        order.extend(sorted(range(start, min(start + run, len(texts))), key=lambda i: lengths[i]))
    return [texts[i] for i in order]


def _feeds(model_path: Path, header, kind: str, texts: list[str], tokenizer, batch_size: int, seq_len: int,
           samples: int | None, bucket: bool = False) -> list[Feed]:
    from permsparse.data.feeds import (
        byte_token_ids,
        lm_text_feeds,
        text_feeds,
        token_feeds,
    )
    from permsparse.data.kinds import vocab_size
    from permsparse.data.text import load_tokenizer

    if kind == "lm":
        if tokenizer is None:
            vocab = vocab_size(header)
            if vocab is None:
                raise PermsparseError("cannot find the decoder's vocabulary size; pass its tokenizer (--tokenizer)")
            return token_feeds(header, byte_token_ids(texts, vocab, seq_len, samples), batch_size, seq_len)
        return lm_text_feeds(header, texts, tokenizer, batch_size, seq_len, samples)
    # encoder batches padded to a multiple of 8 tokens: ~16 distinct lengths instead of ~128, so the CPU's oneDNN
    # kernel cache stays small (bf16 training grew to 2.5 GB RSS on MiniLM with one kernel set per length); the
    # loss ignores the padding
    texts = texts[: samples if samples is not None else None]
    if bucket:
        tokenizer = load_tokenizer(tokenizer)  # loaded once: the lengths and the feeds tokenize with it
        texts = _bucketed(texts, tokenizer, batch_size, seq_len)
    return text_feeds(header, texts, tokenizer, batch_size, seq_len, pad_multiple=PAD_MULTIPLE)


def recovery_data(model_path: Path, cfg, teacher_path: Path | None = None) -> RecoveryData:
    """Training and early-stopping batches for the model at ``model_path`` (see the module docstring); the tokenizer
    is ``cfg.tokenizer``, else the one beside the student, else the one beside the teacher (a student written to
    another folder, e.g. by an earlier recovery, has none of its own)."""
    from permsparse.data.kinds import ids_spec, load_header, model_inputs, model_kind
    from permsparse.data.text import find_tokenizer

    header = load_header(str(model_path))
    kind = model_kind(header)
    if kind not in ("lm", "text"):
        raise PermsparseError(f"recovery trains text models (decoders, encoders); this model takes {kind} input")
    tokenizer = cfg.tokenizer or find_tokenizer(model_path) or \
        (find_tokenizer(teacher_path) if teacher_path is not None else None)
    if tokenizer is None and kind == "lm":
        log.warning("no tokenizer beside %s or its teacher: byte ids modulo the vocabulary (structure only); pass "
                    "--tokenizer DIR", model_path)
    texts, source = _texts(cfg.calib, cfg.seed)
    # early-stopping slice: enough texts for stop_samples sequences (decoders pack ~seq_len/40 words per text)
    per_seq = max(1, cfg.seq_len // 40) if kind == "lm" else 1
    n_stop = min(len(texts) // 4, cfg.stop_samples * per_seq + 1)
    if n_stop < 1 or len(texts) - n_stop < 1:
        raise PermsparseError(f"--calib gives only {len(texts)} texts; recovery needs at least 2 (train + held out)")
    stop = _feeds(model_path, header, kind, texts[:n_stop], tokenizer, cfg.batch_size, cfg.seq_len,
                  cfg.stop_samples)
    train = _feeds(model_path, header, kind, texts[n_stop:], tokenizer, cfg.batch_size, cfg.seq_len,
                   cfg.max_windows, bucket=True)
    ids_name = ids_spec(model_inputs(header)).name
    digest = hashlib.sha256()
    tokens = 0
    for f in [*train, *stop]:
        digest.update(np.ascontiguousarray(f[ids_name]).tobytes())
    for f in train:
        mask = f.get("attention_mask")
        tokens += int(np.asarray(mask).sum()) if mask is not None else int(f[ids_name].size)
    log.info("recovery data: %s, %d training batches (%d tokens), %d early-stopping batches", source, len(train),
             tokens, len(stop))
    return RecoveryData(train, stop, kind, source, tokens, digest.hexdigest(), kind != "lm" or tokenizer is not None)


__all__ = ["RecoveryData", "recovery_data"]
