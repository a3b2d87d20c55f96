"""Text as the model's own tokenizer says it (BOS when the tokenizer adds one, no chat template), ``--calib`` text
sources (.txt, .jsonl, folders), and the errors and warnings for too little text."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from permsparse.data import corpus
from permsparse.data.feeds import lm_token_windows, make_feeds
from permsparse.data.metrics import evaluate_drift, perplexity
from permsparse.data.text import read_texts, special_affixes
from permsparse.errors import PermsparseError

VOCAB = 64


def _bos_tokenizer(folder, add_bos: bool = True):
    """A word-level tokenizer saved as tokenizer.json (+ config), whose post-processor puts <s> before every text
    when ``add_bos`` (as LLaMA/Gemma tokenizers do), or nothing (as GPT-2/SmolLM2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [w for w in (
        "the of and to a in is was for on that with as by at from it an be are his he this which or had not "
        "but have were has its their one first also they new after who been more two been time "
        "house member minister government people year would will there").split()][: VOCAB - 3]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return folder


def _decoder(path, vocab: int = VOCAB, hidden: int = 8):
    """A tiny decoder-like ONNX (input_ids, attention_mask -> logits) that is a valid model for feeds and drift."""
    rng = np.random.default_rng(0)
    emb = helper.make_tensor("emb", TensorProto.FLOAT, [vocab, hidden], rng.standard_normal((vocab, hidden)).astype(np.float32).ravel())
    head = helper.make_tensor("head", TensorProto.FLOAT, [hidden, vocab], rng.standard_normal((hidden, vocab)).astype(np.float32).ravel())
    g = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["h"]), helper.make_node("MatMul", ["h", "head"], ["logits"])],
        "dec",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
        [emb, head],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_special_affixes_follow_the_tokenizer(tmp_path):
    from permsparse.data.text import load_tokenizer

    with_bos = load_tokenizer(_bos_tokenizer(tmp_path / "bos"))
    without = load_tokenizer(_bos_tokenizer(tmp_path / "nobos", add_bos=False))
    assert special_affixes(with_bos) == ([1], [])
    assert special_affixes(without) == ([], [])
    bert = load_tokenizer(None)  # all-MiniLM-L6-v2's BERT tokenizer: [CLS] ... [SEP]
    assert special_affixes(bert) == ([bert.cls_token_id], [bert.sep_token_id])


def test_windows_start_with_bos_when_the_tokenizer_adds_one(tmp_path):
    texts = corpus.texts("wiki", "calib", 200)
    tok = _bos_tokenizer(tmp_path / "bos")
    w = lm_token_windows(texts, tok, seq_len=16, samples=10)
    assert w.shape == (10, 16)
    assert (w[:, 0] == 1).all()  # every window led by <s>
    assert not (w[:, 1:] == 1).any()  # and <s> nowhere else: texts are joined by EOS (id 2), not BOS
    assert (w[:, 1:] == 2).any()
    plain = lm_token_windows(texts, _bos_tokenizer(tmp_path / "nobos", add_bos=False), seq_len=16, samples=10)
    assert not (plain == 1).any()
    # the BOS-led windows hold the same token stream, 15 content tokens per window
    np.testing.assert_array_equal(w[:, 1:].ravel(), plain.ravel()[: 10 * 15])


def test_optimum_folder_tokenizer_used_for_calibration_and_evaluation(tmp_path):
    """An export folder (model.onnx + config.json + tokenizer files): the tokenizer beside the model is used, and
    both calibration and held-out evaluation feeds start every window with its BOS."""
    folder = tmp_path / "export"
    folder.mkdir()
    _bos_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}))
    model = _decoder(folder / "model.onnx")
    calib = make_feeds(model, None, samples=4, batch_size=2, seq_len=12)
    held = make_feeds(model, "parliament", samples=4, batch_size=2, seq_len=12, split="heldout")
    for feeds in (calib, held):
        ids = np.concatenate([f["input_ids"] for f in feeds])
        assert ids.shape == (4, 12) and (ids[:, 0] == 1).all()
        np.testing.assert_array_equal(feeds[0]["position_ids"][0], np.arange(12))
    r = evaluate_drift(model, model, held, lm=True)
    assert r["ppl_dense"] == pytest.approx(r["ppl_sparse"]) and r["tokens"] == 4 * 11
    one = perplexity(model, held)
    assert one["ppl"] == pytest.approx(r["ppl_dense"], rel=1e-12) and one["tokens"] == 4 * 11


def test_calib_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("the house of the people\n\nthe minister was new\n")
    (tmp_path / "b.jsonl").write_text('{"text": "the government and the people"}\n\n"a plain string record"\n')
    assert read_texts(tmp_path / "a.txt") == ["the house of the people", "the minister was new"]
    assert read_texts(tmp_path / "b.jsonl") == ["the government and the people", "a plain string record"]
    assert len(read_texts(tmp_path)) == 4  # the folder: both files, sorted
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(PermsparseError, match=r'bad.jsonl:1: a JSON record without a "text" field'):
        read_texts(tmp_path / "bad.jsonl")


def test_user_calib_file_feeds_the_decoder(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    _bos_tokenizer(folder)
    model = _decoder(folder / "model.onnx")
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in corpus.texts("parliament", "calib", 50)))
    feeds = make_feeds(model, data, samples=6, batch_size=3, seq_len=10)
    ids = np.concatenate([f["input_ids"] for f in feeds])
    assert ids.shape == (6, 10) and (ids[:, 0] == 1).all()


@pytest.mark.parametrize("content", ["", "\n\n  \n", '{"text": ""}\n'])
def test_empty_calib_refused_in_one_line(tmp_path, content):
    folder = tmp_path / "export"
    folder.mkdir()
    _bos_tokenizer(folder)
    model = _decoder(folder / "model.onnx")
    data = tmp_path / ("empty.jsonl" if content.startswith("{") else "empty.txt")
    data.write_text(content)
    with pytest.raises(PermsparseError, match="holds no text") as exc:
        make_feeds(model, data, samples=4, seq_len=8)
    assert "\n" not in str(exc.value)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(PermsparseError, match=r"no \.txt, \.jsonl or \.json files"):
        make_feeds(model, empty_dir, samples=4, seq_len=8)


def test_too_little_text_says_how_to_give_more(tmp_path, caplog):
    folder = tmp_path / "export"
    folder.mkdir()
    _bos_tokenizer(folder)
    model = _decoder(folder / "model.onnx")
    data = tmp_path / "short.txt"
    data.write_text("the house of the people and the minister\n" * 3)  # 24 words + 3 EOS = 27 tokens
    with caplog.at_level(logging.WARNING, logger="permsparse.data.feeds"):
        feeds = make_feeds(model, data, samples=50, batch_size=4, seq_len=8)
    assert sum(f["input_ids"].shape[0] for f in feeds) == 3  # 27 tokens // 7 per window (+ BOS each)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "only 3 windows of 7 tokens (50 asked for)" in msg and "--calib" in msg and "--calib-samples" in msg
    with pytest.raises(PermsparseError, match="fewer than 63 tokens.*give more text"):
        make_feeds(model, data, samples=2, seq_len=64)


def test_export_folder_resolves_to_its_model(tmp_path):
    import permsparse
    from permsparse.data.kinds import model_file

    folder = tmp_path / "optimum"
    folder.mkdir()
    _bos_tokenizer(folder)
    with pytest.raises(PermsparseError, match="no .onnx model"):
        model_file(folder)
    _decoder(folder / "decoder_model.onnx")
    _decoder(folder / "decoder_with_past_model.onnx")
    assert model_file(folder) == folder / "decoder_model.onnx"
    _decoder(folder / "model.onnx")
    assert model_file(folder) == folder / "model.onnx"
    assert model_file(folder / "decoder_model.onnx") == folder / "decoder_model.onnx"
    other = tmp_path / "two"
    other.mkdir()
    _decoder(other / "a.onnx")
    _decoder(other / "b.onnx")
    with pytest.raises(PermsparseError, match="several models"):
        model_file(other)
    feeds = make_feeds(folder, None, samples=2, batch_size=2, seq_len=8)  # tokenizer found in the folder: BOS-led
    assert (feeds[0]["input_ids"][:, 0] == 1).all()
    info = permsparse.inspect(folder)  # the public API takes the folder
    assert len(info.weights) == 1
