"""permsparse.models: builders, loaders and both ONNX exporters, checked against torch on onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from permsparse.errors import PermsparseError
from permsparse.models import (
    build_llama,
    build_vit,
    count_linear,
    export_model,
    export_onnx,
    linear_matmuls,
    llama_config,
    load_hf_checkpoint,
    vit_config,
)

EXPORTERS = ["dynamo", "legacy"]
RTOL_SCALE = 1e-4  # max |onnx - torch| <= 1e-4 * max |torch|


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _text_inputs(vocab: int, batch: int, seq: int, seed: int, mask: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(1000 if vocab > 2000 else 0, vocab, (batch, seq), generator=gen)}
    if mask:
        m = torch.ones(batch, seq, dtype=torch.int64)
        m[-1, seq // 2 :] = 0  # one padded row: exercises the attention mask
        inputs["attention_mask"] = m
    return inputs


# Each case: (module factory, two input sets of different batch/seq sizes, expected number of linear MatMuls).
def _minilm_case():
    from permsparse.models.minilm import build_minilm

    module = build_minilm()
    return module, [_text_inputs(30522, 1, 7, 1, True), _text_inputs(30522, 3, 19, 2, True)], 36


def _vit_case():
    cfg = vit_config("tiny")
    gen = torch.Generator().manual_seed(3)
    shape = (cfg.in_chans, cfg.image_size, cfg.image_size)
    inputs = [{"pixel_values": torch.randn(1, *shape, generator=gen)}, {"pixel_values": torch.randn(3, *shape, generator=gen)}]
    return build_vit(cfg, seed=0), inputs, cfg.depth * 6 + 1


def _llama_case():
    cfg = llama_config("tiny")
    inputs = [_text_inputs(cfg.vocab_size, 1, 5, 4, False), _text_inputs(cfg.vocab_size, 3, 23, 5, False)]
    return build_llama(cfg, seed=0), inputs, cfg.n_layers * 7 + 1


CASES = {"minilm": _minilm_case, "vit": _vit_case, "llama": _llama_case}
AXES = {
    "minilm": (
        {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
         "last_hidden_state": {0: "batch", 1: "seq"}},
        ["last_hidden_state"],
    ),
    "vit": ({"pixel_values": {0: "batch"}, "logits": {0: "batch"}}, ["logits"]),
    "llama": ({"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}, ["logits"]),
}


@pytest.fixture(scope="module")
def built() -> dict:
    """Each model built once for the module (MiniLM loading is the slow part)."""
    return {}


def _get(built: dict, name: str):
    if name not in built:
        built[name] = CASES[name]()
    return built[name]


def _assert_linears_are_matmuls(model_path: Path, module: torch.nn.Module, expected: int) -> None:
    model = onnx.load(str(model_path))
    found = linear_matmuls(model)
    assert count_linear(module) == expected
    assert len(found) == expected, [f.shape for f in found]
    assert not [n for n in model.graph.node if n.op_type == "Gemm"]
    inits = {i.name: i for i in model.graph.initializer}
    arrays = [numpy_helper.to_array(inits[f.weight]) for f in found if f.weight in inits]
    assert len(arrays) == expected
    # Every nn.Linear weight W [N, K] appears as a MatMul initializer equal to W.T [K, N].
    for lin in (m for m in module.modules() if isinstance(m, torch.nn.Linear)):
        wt = lin.weight.detach().numpy().T
        assert any(a.shape == wt.shape and np.array_equal(a, wt) for a in arrays), tuple(wt.shape)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["vit", "llama", "minilm"])
def test_export_matches_torch(built: dict, tmp_path: Path, name: str, exporter: str) -> None:
    module, input_sets, n_linear = _get(built, name)
    axes, outputs = AXES[name]
    path = export_onnx(
        module, input_sets[1], tmp_path / f"{name}.onnx", dynamo=exporter == "dynamo",
        dynamic_axes=axes, output_names=outputs,
    )
    assert path == tmp_path / f"{name}.onnx" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.onnx"]  # no temp files, no .data
    _assert_linears_are_matmuls(path, module, n_linear)

    sess = _session(path)
    out = sess.get_outputs()[0]
    assert out.name == outputs[0]
    for axis, dim in axes[outputs[0]].items():
        assert out.shape[axis] == dim
    for inputs in input_sets:  # two batch/seq sizes: the axes are really dynamic
        with torch.no_grad():
            ref = module(**inputs).numpy()
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        assert got.shape == ref.shape
        err = float(np.abs(got - ref).max())
        assert err <= RTOL_SCALE * float(np.abs(ref).max()), (err, float(np.abs(ref).max()))


def test_builders_are_seeded_and_not_degenerate() -> None:
    a, b, c = build_vit("tiny", seed=0), build_vit("tiny", seed=0), build_vit("tiny", seed=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), c(x))
    ln = a.blocks[0].norm1
    assert not torch.all(ln.weight == 1) and torch.all(ln.bias != 0)
    assert torch.all(a.blocks[0].attn.q.bias != 0)
    assert abs(float(a.blocks[0].mlp.fc1.weight.detach().std()) - 0.0176) < 0.003  # trunc normal std 0.02 at ±2σ
    assert float(a.blocks[0].mlp.fc1.weight.detach().abs().max()) <= 0.04 + 1e-7

    llama = build_llama("tiny", seed=0)
    assert not torch.all(llama.layers[0].input_layernorm.weight == 1)
    assert all(m.bias is None for m in llama.modules() if isinstance(m, torch.nn.Linear))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = llama(ids)
        prefix = llama(ids[:, :7])
    assert full.shape == (2, 12, 256)
    torch.testing.assert_close(full[:, :7], prefix, rtol=1e-5, atol=1e-5)  # causal, RoPE from position 0


def test_tied_llama_config_ties_weights() -> None:
    from permsparse.models.llama import LlamaConfig

    m = build_llama(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, tie_embeddings=True))
    assert m.lm_head.weight is m.embed_tokens.weight


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_external_data_single_file(tmp_path: Path, exporter: str) -> None:
    module = build_vit("tiny", seed=0)
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    path = export_onnx(
        module, x, tmp_path / "m.onnx", dynamo=exporter == "dynamo", dynamic_axes={"pixel_values": {0: "batch"}},
        output_names=["logits"], external_data=True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    locations = {
        kv.value
        for init in onnx.load(str(path), load_external_data=False).graph.initializer
        for kv in init.external_data
        if kv.key == "location"
    }
    assert locations == {"m.onnx.data"}
    with torch.no_grad():
        ref = module(**x).numpy()
    got = _session(path).run(None, {"pixel_values": x["pixel_values"].numpy()})[0]
    assert np.abs(got - ref).max() <= RTOL_SCALE * np.abs(ref).max()


def test_export_overwrites_atomically(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "vit.onnx"
    export_model("vit", out, exporter="legacy", seed=0)
    first = out.read_bytes()
    export_model("vit", out, exporter="legacy", seed=1)
    assert out.read_bytes() != first
    assert [p.name for p in out.parent.iterdir()] == ["vit.onnx"]


def test_user_errors(tmp_path: Path) -> None:
    with pytest.raises(PermsparseError, match="unknown model"):
        export_model("resnet", tmp_path / "x.onnx")
    with pytest.raises(PermsparseError, match="unknown ViT size"):
        export_model("vit", tmp_path / "x.onnx", size="1b")
    with pytest.raises(PermsparseError, match="exporter"):
        export_model("vit", tmp_path / "x.onnx", exporter="jit")
    with pytest.raises(PermsparseError, match="--hf-dir"):
        export_model("hf", tmp_path / "x.onnx")
    with pytest.raises(PermsparseError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "missing")
    with pytest.raises(PermsparseError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(PermsparseError, match="at least 2"):
        export_onnx(
            build_vit("tiny"), {"pixel_values": torch.randn(1, 3, 32, 32)}, tmp_path / "x.onnx", dynamo=True,
            dynamic_axes={"pixel_values": {0: "batch"}}, output_names=["logits"],
        )
    assert not list(tmp_path.iterdir())


def test_hf_causal_lm_checkpoint(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    loaded = load_hf_checkpoint(tmp_path / "ckpt")
    assert loaded.task == "causal-lm" and loaded.output_names == ["logits"]
    module, inputs, axes, outputs = loaded
    path = export_onnx(module, inputs, tmp_path / "lm.onnx", dynamo=False, dynamic_axes=axes, output_names=outputs)
    assert len(linear_matmuls(onnx.load(str(path)))) == 7 + 1
    ids = torch.randint(0, 128, (3, 9))
    with torch.no_grad():
        ref = module(input_ids=ids).numpy()
    got = _session(path).run(None, {"input_ids": ids.numpy()})[0]
    assert np.abs(got - ref).max() <= RTOL_SCALE * np.abs(ref).max()


def test_hf_encoder_checkpoint_is_minilm() -> None:
    from permsparse.models.minilm import minilm_path, minilm_tokenizer

    loaded = load_hf_checkpoint(minilm_path())
    assert loaded.task == "encoder" and list(loaded.example_inputs) == ["input_ids", "attention_mask"]
    tok = minilm_tokenizer()
    enc = tok(["a sentence", "another one here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = loaded.module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert out.shape[-1] == 384


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from permsparse.cli import main

    out = tmp_path / "llama.onnx"
    assert main(["export", "llama", "-o", str(out), "--exporter", "legacy", "--seed", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert out.is_file() and "\n" not in line and "15 MatMul weights" in line, line
    code = main(["export", "llama", "-o", str(tmp_path / "x.onnx"), "--exporter", "jit"])  # a one-line usage error
    assert code == 2 and not (tmp_path / "x.onnx").exists()
