"""``optimize``'s configuration: the user's options resolved once into typed, frozen stage configs, model-dependent
defaults included, and reported as flat options (recipe, ``--json``) that resolve back to the same config."""

from __future__ import annotations

import dataclasses
import json

import pytest

from permsparse.errors import UsageError
from permsparse.pattern import NMPattern
from permsparse.pipeline.config import (
    DEFAULTS,
    ENCODER_CALIB_SAMPLES,
    ENCODER_FINETUNE_EPOCHS,
    ENCODER_FINETUNE_LR,
    ModelFacts,
    OptimizeConfig,
    ResolvedConfig,
    resolve,
)


def _from_dict(d: dict) -> OptimizeConfig:
    opts = dict(d)
    opts["exclude"] = tuple(opts["exclude"])
    return OptimizeConfig(**opts)


def test_defaults_come_from_one_table_and_are_frozen():
    cfg = resolve(OptimizeConfig())
    assert isinstance(cfg, ResolvedConfig)
    assert cfg.permutation.method == DEFAULTS["method"] == "lsa"
    assert cfg.permutation.policy == "local" and cfg.mask.importance == "wanda" and cfg.mask.pattern == NMPattern()
    assert cfg.reconstruction.method == "sparsegpt" and cfg.reconstruction.sequential is True
    assert cfg.reconstruction.damp == DEFAULTS["damp"] == 0.1
    assert (cfg.calibration.samples, cfg.calibration.seq_len) == (128, 128)
    assert cfg.check.rtol == DEFAULTS["rtol"] and cfg.check.mode == "auto"
    assert cfg.blockwise and cfg.needs_calibration and cfg.notes == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mask.importance = "magnitude"  # type: ignore[misc]


def test_given_options_win_and_bad_ones_fail_before_any_model():
    cfg = resolve(OptimizeConfig(method="identity", pattern="4:8", reconstruct="none", importance="magnitude",
                                 seed=7, exclude=("head",)))
    assert (cfg.permutation.method, str(cfg.pattern), cfg.reconstruction.method, cfg.seed) == ("identity", "4:8",
                                                                                                 "none", 7)
    assert not cfg.blockwise and not cfg.needs_calibration and cfg.mask.exclude == ("head",)
    for bad, word in ((dict(method="nope"), "--method"), (dict(damp=1.5), "--damp"), (dict(rtol=2.0), "--rtol"),
                      (dict(calib="x.txt", importance="magnitude", reconstruct="none"), "--calib"),
                      (dict(cluster="tcp://x"), "--cluster")):
        with pytest.raises(UsageError, match=word):
            resolve(OptimizeConfig(**bad))


def test_model_dependent_defaults_are_decided_in_resolve():
    text = resolve(OptimizeConfig(), ModelFacts("text", has_blocks=True))
    assert text.calibration.samples == ENCODER_CALIB_SAMPLES
    assert text.reconstruction.finetune_epochs == ENCODER_FINETUNE_EPOCHS
    assert text.reconstruction.finetune_lr == ENCODER_FINETUNE_LR
    assert [level for level, _ in text.notes] == ["info"]
    # an option the user gave keeps the encoder defaults out
    given = resolve(OptimizeConfig(finetune_epochs=1), ModelFacts("text", has_blocks=True))
    assert given.reconstruction.finetune_epochs == 1 and given.notes == ()
    # inputs neither token ids nor images: magnitude masking, with a warning note
    unknown = resolve(OptimizeConfig(), ModelFacts(None, "cannot tell what data this model takes"))
    assert (unknown.mask.importance, unknown.reconstruction.method) == ("magnitude", "none")
    assert not unknown.blockwise and unknown.notes[0][0] == "warning" and "Falling back" in unknown.notes[0][1]
    # no blocks, or an op the torch evaluator lacks: the defaults mask without reconstruction
    for facts, why in ((ModelFacts("image", has_blocks=False), "no Transformer blocks"),
                       (ModelFacts("image", has_blocks=True, missing_ops=("Foo",)), "lacks op(s) Foo")):
        cfg = resolve(OptimizeConfig(), facts)
        assert cfg.reconstruction.method == "none" and cfg.reconstruction.finetune_epochs == 0 and not cfg.blockwise
        assert why in cfg.notes[-1][1]
    # ... but an explicit block-wise option is kept (the block-wise step then says what to do)
    asked = resolve(OptimizeConfig(reconstruct="sparsegpt"), ModelFacts("image", has_blocks=False))
    assert asked.reconstruction.method == "sparsegpt" and asked.blockwise


def test_flat_report_round_trips():
    given = OptimizeConfig(method="channel_swap", pattern="4:8", finetune_epochs=2, exclude=("lm_head",), seed=3)
    cfg = resolve(given, ModelFacts("text", has_blocks=True))
    flat = cfg.to_dict()
    json.dumps(flat)  # JSON-friendly
    assert set(flat) == {f.name for f in dataclasses.fields(OptimizeConfig)} - {"recipe_perms", "progress", "evaluate"}
    assert flat["pattern"] == "4:8" and flat["finetune_epochs"] == 2 and flat["exclude"] == ["lm_head"]
    again = resolve(_from_dict(flat), ModelFacts("text", has_blocks=True))
    assert dataclasses.replace(again, notes=()) == dataclasses.replace(cfg, notes=())
    assert all(cfg.option(name) == again.option(name) for name in flat)
