"""Calibration and evaluation feeds that match a model's graph inputs (names, dtypes, static dims).

A *feed* is one batch: a dict from graph-input name to a NumPy array, ready for ``onnxruntime``'s ``session.run``.
Builders return lists of feeds (re-iterable, so evaluation can run a dense and a sparse model over the same data).

- :func:`text_feeds`: BERT-like encoders; one text per example, padded per batch (``input_ids``, ``attention_mask``,
  ``token_type_ids``: only those the model has, in its integer dtype).
- :func:`token_feeds` / :func:`read_token_ids`: decoders fed pre-tokenized ids (``.npy [N, S]`` or a text file of
  whitespace-separated ints per line).
- :func:`lm_text_feeds` / :func:`lm_token_windows`: decoders fed text: the texts are tokenized as the model's own
  tokenizer says (its BOS leads every window when it adds one; no chat template), concatenated and cut into windows.
- :func:`byte_token_ids`: a tokenizer-free fallback mapping text bytes to ids modulo the vocabulary (structure tests).
- :func:`make_feeds`: picks the builder from the model's inputs and the source; images: :mod:`.images`.

Other inputs a decoder export may have are filled in: ``position_ids`` (from the attention mask), empty
``past_key_values.*`` (past length 0, when their other dims are static) and ``use_cache_branch`` (False).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from permsparse.data.images import IMAGE_EXTENSIONS, image_feeds
from permsparse.data.kinds import (
    KINDS,
    batches_static,
    load_header,
    model_file,
    model_inputs,
    model_kind,
    vocab_size,
)
from permsparse.data.kinds import ids_spec as find_ids
from permsparse.data.text import (
    ensure_pad,
    find_tokenizer,
    load_tokenizer,
    read_texts,
    require_texts,
    special_affixes,
)
from permsparse.errors import PermsparseError
from permsparse.ir.inputs import InputSpec

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
BERT_UNCASED_VOCAB = 30522  # all-MiniLM-L6-v2's tokenizer (the default for encoders with this vocabulary)


def _complete_feed(specs: Sequence[InputSpec], input_ids: np.ndarray, attention_mask: np.ndarray | None) -> Feed:
    """A feed with every graph input filled from ``input_ids [B, S]`` and its mask, in the model's dtypes."""
    b, s = input_ids.shape
    mask = np.ones((b, s), dtype=np.int64) if attention_mask is None else attention_mask.astype(np.int64)
    feed: Feed = {}
    unknown = []
    ids_spec = find_ids(specs)
    for spec in specs:
        if ids_spec is not None and spec.name == ids_spec.name:
            feed[spec.name] = input_ids.astype(spec.dtype)
        elif spec.name == "attention_mask":
            feed[spec.name] = mask.astype(spec.dtype)
        elif spec.name == "token_type_ids":
            feed[spec.name] = np.zeros((b, s), dtype=spec.dtype)
        elif spec.name == "position_ids":
            pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
            feed[spec.name] = pos.astype(spec.dtype)
        elif spec.name == "use_cache_branch":
            feed[spec.name] = np.zeros((1,), dtype=spec.dtype)
        elif spec.name.startswith("past_key_values") or spec.name.startswith("past_"):
            if len(spec.shape) != 4 or spec.static(1) is None or spec.static(3) is None:
                raise PermsparseError(
                    f"input {spec.name!r} has shape {spec.shape}; an empty KV cache needs static heads and head_dim. "
                    "Export the decoder without a KV cache (use_cache=False)"
                )
            feed[spec.name] = np.zeros((b, spec.static(1), 0, spec.static(3)), dtype=spec.dtype)
        else:
            unknown.append(f"{spec.name} {spec.shape} {spec.dtype}")
    if unknown:
        raise PermsparseError(
            f"do not know how to fill model inputs {unknown} for text data; export the model with only "
            "input_ids/attention_mask/token_type_ids/position_ids inputs"
        )
    return feed


def _check_ids(ids: np.ndarray, specs: Sequence[InputSpec], vocab: int | None, what: str) -> None:
    if vocab is not None and ids.size and int(ids.max()) >= vocab:
        raise PermsparseError(
            f"{what} produced token id {int(ids.max())} but the model's vocabulary has {vocab} rows; "
            "pass the model's own tokenizer directory (--tokenizer DIR)"
        )
    if ids.size and int(ids.min()) < 0:
        raise PermsparseError(f"{what} has negative token ids; token ids must be >= 0")


# --------------------------------------------------------------------------------------------------------------------
# Text and token builders
# --------------------------------------------------------------------------------------------------------------------


def text_feeds(
    model: onnx.ModelProto | str | os.PathLike,
    texts: Sequence[str],
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int = 128,
    pad_multiple: int | None = None,
) -> list[Feed]:
    """Encoder feeds: one text per example, truncated to ``max_length`` tokens and padded to the longest in its batch
    (or to the model's static sequence length).

    Args:
        tokenizer: a tokenizer object, a local tokenizer directory, or ``None`` for all-MiniLM-L6-v2's.
        pad_multiple: pad each batch up to a multiple of this many tokens, so batches come in few distinct lengths
            (training: oneDNN keeps one kernel per shape; see ``permsparse.recover.data``); ignored unless it divides
            ``max_length`` (never pads past it) and for a static sequence length.
    """
    specs = model_inputs(model)
    ids_spec = find_ids(specs)
    if ids_spec is None:
        raise PermsparseError("this model has no integer input_ids input; text feeds do not apply (use image data)")
    texts = [str(t) for t in texts]
    if not texts:
        raise PermsparseError("no texts to build feeds from; give a non-empty text source")
    tok = load_tokenizer(tokenizer)
    ensure_pad(tok)
    static_s = ids_spec.static(1)
    if static_s is not None and static_s != max_length:
        logger.warning("model input %s has a static length of %d tokens; using it", ids_spec.name, static_s)
        max_length = static_s
    bsz = batches_static(ids_spec, batch_size)
    if ids_spec.static(0) is not None and len(texts) % bsz:
        dropped = len(texts) % bsz
        logger.warning("dropping the last %d texts: the model's batch is fixed at %d", dropped, bsz)
        texts = texts[: len(texts) - dropped]
    vocab = vocab_size(model)
    # padding up stays within max_length only when the multiple divides it
    pad_up = bool(pad_multiple) and static_s is None and max_length % pad_multiple == 0
    feeds = []
    for i in range(0, len(texts), bsz):
        enc = tok(
            texts[i : i + bsz],
            padding="max_length" if static_s is not None else "longest",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
            **({"pad_to_multiple_of": pad_multiple} if pad_up else {}),
        )
        ids = np.asarray(enc["input_ids"])
        _check_ids(ids, specs, vocab, "the tokenizer")
        feed = _complete_feed(specs, ids, np.asarray(enc["attention_mask"]))
        if "token_type_ids" in feed and "token_type_ids" in enc:
            feed["token_type_ids"] = np.asarray(enc["token_type_ids"]).astype(feed["token_type_ids"].dtype)
        feeds.append(feed)
    return feeds


def read_token_ids(path: str | os.PathLike) -> np.ndarray | list[np.ndarray]:
    """Token ids from ``.npy`` (an integer array ``[N, S]``) or a text file of whitespace-separated ints per line.

    Returns an ``int64 [N, S]`` array, or a list of 1-D arrays when the lines have different lengths.
    """
    p = Path(path)
    if not p.is_file():
        raise PermsparseError(f"token-id file {str(p)!r} does not exist")
    if p.suffix == ".npy":
        arr = np.load(p, mmap_mode="r")
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim not in (1, 2):
            raise PermsparseError(f"{p}: a token-id .npy must be an integer array [N, S], got {arr.dtype} {arr.shape}")
        return np.asarray(arr, dtype=np.int64).reshape(-1, arr.shape[-1])
    rows = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(np.array([int(x) for x in line.split()], dtype=np.int64))
            except ValueError as exc:
                raise PermsparseError(f"{p}:{lineno}: expected whitespace-separated integer token ids") from exc
    if not rows:
        raise PermsparseError(f"{p} holds no token ids")
    if len({r.shape[0] for r in rows}) == 1:
        return np.stack(rows)
    return rows


def _windows(stream: np.ndarray, seq_len: int, samples: int | None, what: str) -> np.ndarray:
    n = stream.shape[0] // seq_len
    if samples is not None:
        if n < samples:
            logger.warning(
                "%s give only %d windows of %d tokens (%d asked for): %s", what, n, seq_len, samples,
                _MORE_TEXT if n else "none at all",
            )
        n = min(n, samples)
    if n == 0:
        raise PermsparseError(
            f"{what} hold fewer than {seq_len} tokens ({stream.shape[0]}), not one window; {_MORE_TEXT}"
        )
    return stream[: n * seq_len].reshape(n, seq_len)


_MORE_TEXT = (
    "give more text (--calib FILE|DIR: a .txt with one text per line, .jsonl with a \"text\" field, or a folder of "
    "them; or the built-in mix: no --calib), or ask for fewer or shorter windows (--calib-samples, --calib-seq-len)"
)


def token_feeds(
    model: onnx.ModelProto | str | os.PathLike,
    ids: np.ndarray | Sequence[np.ndarray] | str | os.PathLike,
    batch_size: int = 8,
    seq_len: int | None = None,
    samples: int | None = None,
) -> list[Feed]:
    """Decoder feeds from token ids: an array ``[N, S]``, ragged rows, or a file (see :func:`read_token_ids`).

    Ragged rows, or any rows when ``seq_len`` differs from their length, are concatenated and cut into ``seq_len``
    windows. Every feed has a full attention mask (no padding).
    """
    specs = model_inputs(model)
    ids_spec = find_ids(specs)
    if ids_spec is None:
        raise PermsparseError("this model has no integer input_ids input; token feeds do not apply")
    data = read_token_ids(ids) if isinstance(ids, (str, os.PathLike)) else ids
    static_s = ids_spec.static(1)
    if static_s is not None:
        seq_len = static_s
    if isinstance(data, np.ndarray) and data.ndim == 2 and (seq_len is None or seq_len == data.shape[1]):
        arr = data.astype(np.int64)
        if samples is not None:
            arr = arr[:samples]
    else:
        rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in (data if not isinstance(data, np.ndarray) else list(data))]
        stream = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        arr = _windows(stream, int(seq_len or 128), samples, "the token ids")
    _check_ids(arr, specs, vocab_size(model), "the token-id data")
    bsz = batches_static(ids_spec, batch_size)
    if ids_spec.static(0) is not None:
        arr = arr[: (arr.shape[0] // bsz) * bsz]
    if arr.shape[0] == 0:
        raise PermsparseError("no token windows to build feeds from; give more token ids")
    return [_complete_feed(specs, arr[i : i + bsz], None) for i in range(0, arr.shape[0], bsz)]


def lm_token_windows(
    texts: Sequence[str], tokenizer: Any, seq_len: int = 128, samples: int | None = None, what: str = "the texts"
) -> np.ndarray:
    """``[N, seq_len]`` token windows of ``texts`` as the model's own tokenizer says: each text tokenized without
    special tokens, the texts joined by the tokenizer's own end-of-text suffix (else its EOS), the stream cut into
    windows of ``seq_len - len(prefix)`` tokens, and each window led by the special prefix the tokenizer puts before
    a text (its BOS when it adds one: ``add_bos_token`` or its post-processor template; nothing for GPT-2, SmolLM2 or
    Qwen). No chat template. At most ``samples`` windows (fewer, with a warning saying how to give more text)."""
    tok = load_tokenizer(tokenizer)
    prefix, suffix = special_affixes(tok)
    eos = getattr(tok, "eos_token_id", None)
    sep = list(suffix) if suffix else ([] if eos is None else [int(eos)])
    body = seq_len - len(prefix)
    if body < 1:
        raise PermsparseError(f"seq_len={seq_len} leaves no room after the tokenizer's {len(prefix)} leading special tokens")
    parts = []
    need = None if samples is None else samples * body
    have = 0
    for text in texts:
        ids = list(tok(str(text), add_special_tokens=False)["input_ids"]) + sep
        parts.append(np.asarray(ids, dtype=np.int64))
        have += len(ids)
        if need is not None and have >= need:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    win = _windows(stream, body, samples, what)
    if prefix:
        win = np.concatenate([np.broadcast_to(np.asarray(prefix, np.int64), (win.shape[0], len(prefix))), win], axis=1)
    return win


def lm_text_feeds(
    model: onnx.ModelProto | str | os.PathLike,
    texts: Sequence[str],
    tokenizer: Any,
    batch_size: int = 8,
    seq_len: int = 128,
    samples: int | None = None,
) -> list[Feed]:
    """Decoder feeds from text: :func:`lm_token_windows` (tokenized as the model's tokenizer says, BOS-led when it
    adds a BOS), at most ``samples`` windows of ``seq_len`` tokens, no padding."""
    ids = find_ids(model_inputs(model))
    static_s = ids.static(1) if ids is not None else None
    if static_s is not None:
        seq_len = static_s
    return token_feeds(model, lm_token_windows(texts, tokenizer, seq_len, samples, "the tokenized texts"),
                       batch_size, seq_len)


def byte_token_ids(texts: Sequence[str], vocab: int, seq_len: int = 128, samples: int | None = None) -> np.ndarray:
    """Tokenizer-free ids: the UTF-8 bytes of the joined texts, modulo ``vocab``, cut into ``seq_len`` windows.

    For structure tests of seeded decoders that have no tokenizer, not for quality: the ids carry no meaning for
    the model, so perplexities measured on them say nothing about language modelling.
    """
    if vocab <= 1:
        raise PermsparseError(f"vocabulary size must be > 1, got {vocab}")
    need = None if samples is None else samples * seq_len
    chunks, have = [], 0
    for text in texts:
        b = np.frombuffer((str(text) + "\n").encode("utf-8"), dtype=np.uint8).astype(np.int64)
        chunks.append(b)
        have += b.shape[0]
        if need is not None and have >= need:
            break
    stream = (np.concatenate(chunks) if chunks else np.zeros(0, np.int64)) % vocab
    return _windows(stream, seq_len, samples, "the byte-mapped texts")


# --------------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------------


def _looks_like_ids(path: Path) -> bool:
    if path.suffix == ".npy":
        return np.issubdtype(np.load(path, mmap_mode="r").dtype, np.integer)
    if path.suffix not in (".txt", ".ids", ".tokens", ""):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        head = [line for _, line in zip(range(5), f) if line.strip()]
    return bool(head) and all(tok.lstrip("-").isdigit() for line in head for tok in line.split())


def make_feeds(
    model: onnx.ModelProto | str | os.PathLike,
    source: str | os.PathLike | None = None,
    *,
    kind: str = "auto",
    samples: int = 128,
    batch_size: int = 8,
    seq_len: int = 128,
    tokenizer_dir: str | os.PathLike | None = None,
    seed: int = 0,
    split: str = "calib",
) -> list[Feed]:
    """Feeds for ``model`` from ``source``, choosing the builder from the model's inputs and the source.

    Args:
        source: ``None`` (or ``"builtin"``/``"mix"``): the built-in mix of real text of several domains
            (:func:`permsparse.data.corpus.mix`, ``split``) for text models, random images for image models (a
            warning says they are random); one built-in domain by name (:data:`BUILTIN_SOURCES`, e.g. ``"wiki"``);
            a text file (one text per line), ``.json``/``.jsonl`` (a ``"text"`` field per record), or a folder of
            them; a token-id file (``.npy`` int or lines of ints); a folder of images or a ``.npy`` float array for
            image models. An empty text source is refused.
        kind: ``auto`` (from the model), ``text`` (encoder), ``lm`` (decoder windows) or ``image``.
        samples: examples (texts, token windows, images) to produce at most.
        seq_len: max tokens per text (encoders) or window length (decoders).
        tokenizer_dir: the model's tokenizer; default: the tokenizer files beside the model file (an Optimum / HF
            export folder), else all-MiniLM-L6-v2's for BERT-uncased-vocabulary encoders (30522 ids), else byte ids
            modulo the vocabulary for decoders (structure only; a warning says so).
        seed: order of built-in texts and random images.
        split: ``calib``, ``train`` or ``heldout`` for built-in texts (use ``heldout`` for evaluation).
    """
    if kind not in KINDS:
        raise PermsparseError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")
    if isinstance(model, (str, os.PathLike)):
        model = model_file(model)  # an export folder: its model, with the tokenizer beside it
    header = load_header(model)
    k = model_kind(header) if kind == "auto" else kind
    if tokenizer_dir is None and isinstance(model, (str, os.PathLike)) and k != "image":
        tokenizer_dir = find_tokenizer(model)
        if tokenizer_dir is not None:
            logger.info("using the tokenizer beside the model: %s", tokenizer_dir)
    named = None if source is None else str(source)
    builtin = named is None or named in BUILTIN_SOURCES
    path = None if builtin else Path(named)
    if path is not None and not path.exists():
        raise PermsparseError(
            f"calibration source {str(path)!r} does not exist; give a file or folder, or one of the built-in "
            f"sources: {', '.join(BUILTIN_SOURCES)}"
        )
    if k == "image":
        return image_feeds(header, path, batch_size, samples, seed=seed)
    if path is not None and (path.suffix == ".npy" or path.is_dir()) and _is_image_source(path):
        raise PermsparseError(f"{str(path)!r} holds images but the model takes token ids; give text or token ids")
    if path is not None and path.is_file() and _looks_like_ids(path):
        return token_feeds(header, path, batch_size, seq_len if k == "lm" else None, samples)
    if k == "lm":
        texts = builtin_source_texts(named, split, seed, words=samples * seq_len) if path is None else \
            require_texts(read_texts(path), path)
        if tokenizer_dir is None:
            vocab = vocab_size(header)
            if vocab is None:
                raise PermsparseError("cannot find the decoder's vocabulary size; pass its tokenizer (--tokenizer DIR)")
            logger.warning(
                "no tokenizer given for this decoder: mapping text bytes to ids modulo its vocabulary (%d). This is "
                "for structure tests only; pass --tokenizer DIR for meaningful calibration and perplexity", vocab
            )
            return token_feeds(header, byte_token_ids(texts, vocab, seq_len, samples), batch_size, seq_len)
        return lm_text_feeds(header, texts, tokenizer_dir, batch_size, seq_len, samples)
    texts = builtin_source_texts(named, split, seed, n=samples) if path is None else \
        require_texts(read_texts(path), path)[:samples]
    if tokenizer_dir is None and vocab_size(header) not in (None, BERT_UNCASED_VOCAB):
        raise PermsparseError(
            f"no tokenizer for this encoder (vocabulary {vocab_size(header)}): none beside the model file and the "
            "default (all-MiniLM-L6-v2's, 30522 ids) does not fit; pass --tokenizer DIR"
        )
    return text_feeds(header, texts, tokenizer_dir, batch_size, seq_len)


#: ``--calib`` names of built-in text: the default mix of domains, or one domain of :mod:`permsparse.data.corpus`.
BUILTIN_SOURCES: tuple[str, ...] = ("builtin", "mix", "wiki", "news", "film", "manuals", "comments", "parliament")


def builtin_source_texts(name: str | None, split: str, seed: int, *, words: int | None = None,
                         n: int | None = None) -> list[str]:
    """Texts of a built-in source (:data:`BUILTIN_SOURCES`; ``None``/``builtin``/``mix``: the default mix of
    :func:`permsparse.data.corpus.mix`): about ``words`` words (decoder windows) or ``n`` texts (encoders)."""
    from permsparse.data import corpus

    if split not in corpus.SPLITS:
        raise PermsparseError(f"unknown split {split!r}; choose one of {', '.join(corpus.SPLITS)}")
    if name in (None, "builtin", "mix"):
        got = corpus.mix(split, words=words, seed=seed)
    else:
        got = corpus.texts(name, split, seed=seed)
    return got[:n] if n is not None else got


def _is_image_source(path: Path) -> bool:
    if path.suffix == ".npy":
        return np.issubdtype(np.load(path, mmap_mode="r").dtype, np.floating)
    return path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*"))
