"""The registries of permutation methods, importances and ``export`` model families: the CLI choices and the config's
validation read their names from them, so registering one more name is all it takes to offer it.

A real addition registers when its module is imported (the registries' explicit import lists), before the CLI reads
the names; the dummy ones here do the same in a fresh interpreter, then go through the CLI parser, the config's
validation and the dispatch (``make_method``, ``compute_importance``, ``permsparse export``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from permsparse import cli
from permsparse.errors import PermsparseError, UsageError
from permsparse.models.registry import MODEL_FAMILIES, model_family, model_sizes
from permsparse.models.registry import register as register_family
from permsparse.optimizer.importance import IMPORTANCE_REGISTRY, compute_importance
from permsparse.optimizer.importance import register as register_importance
from permsparse.optimizer.methods import METHOD_FACTORIES, make_method
from permsparse.optimizer.methods import register as register_method
from permsparse.pipeline import config

ROOT = Path(__file__).resolve().parents[1]

DUMMY = textwrap.dedent('''
    import json, sys
    import numpy as np
    import permsparse.models.zoo  # the built-in families first, in their order (a new one is listed after them)
    from permsparse.models.registry import register as register_family
    from permsparse.optimizer.importance import register as register_importance
    from permsparse.optimizer.methods import register as register_method

    class Reverse:  # a permutation method: reverse every block
        def solve(self, problem):
            k, b = problem.k, problem.block
            return np.concatenate([np.arange(s, s + b)[::-1] for s in range(0, k, b)])

    @register_method("reverse")
    def _reverse(*, seed, budget_s, learned):
        return Reverse()

    @register_importance("squared", needs="x_norm")
    def _squared(W, s):
        return (np.square(np.asarray(W, np.float64)) * np.asarray(s.x_norm)[:, None]).astype(np.float32)

    @register_family("twolinear", sizes=("xl",))
    def _twolinear(request):
        import torch
        from permsparse.models.hf import LoadedModel
        torch.manual_seed(request.seed)
        module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        return LoadedModel(module, {"input": torch.randn(2, 5, 8)}, {}, ["y"])

    from permsparse import cli   # reads the registries now, as the CLI does
    from permsparse.pipeline import config
    from permsparse.cli import build_parser, main
    from permsparse.optimizer.importance import compute_importance
    from permsparse.optimizer.methods import make_method

    out = {"methods": list(config.METHODS), "importances": list(config.IMPORTANCES),
           "calibrated": sorted(config.CALIBRATED_IMPORTANCES), "models": list(cli.MODEL_NAMES),
           "sizes": list(cli.MODEL_SIZES)}
    args = build_parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--method", "reverse",
                                      "--importance", "squared"])
    out["parsed"] = [args.method, args.importance]
    cfg = config.OptimizeConfig(method="reverse", importance="squared").resolved()
    out["resolved"] = [cfg.permutation.method, cfg.mask.importance, cfg.needs_calibration]
    from permsparse.optimizer.base import PermutationProblem
    p = PermutationProblem(name="u", importances=(np.ones((8, 3)),), block=4)
    out["perm"] = make_method("reverse").solve(p).tolist()
    out["score"] = compute_importance("squared", np.full((2, 1), 2.0), np.array([1.0, 3.0])).ravel().tolist()
    out["export_rc"] = main(["-q", "export", "twolinear", "--size", "xl", "--exporter", "legacy", "-o", sys.argv[1]])
    print(json.dumps(out))
''')


def test_dummy_registrations_reach_cli_config_and_dispatch(tmp_path):
    """One registered method, importance and model family each: offered by the CLI, accepted by the config,
    dispatched by make_method / compute_importance / ``permsparse export``."""
    onnx_path = tmp_path / "two.onnx"
    run = subprocess.run([sys.executable, "-c", DUMMY, str(onnx_path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["methods"] == ["identity", "lsa", "channel_swap", "learned", "reverse"]
    assert out["importances"] == ["magnitude", "wanda", "ria", "squared"]  # obs is registered but not offered
    assert out["calibrated"] == ["ria", "squared", "wanda"]
    from permsparse.models.families import FAMILIES

    tiny = [f"tiny-{name}" for name in FAMILIES]
    assert out["models"] == ["minilm", "smollm2", "vit", "llama", "hf", *tiny, "twolinear"]
    assert out["sizes"] == ["tiny", "small", "b16", "1b", "xl"]
    assert out["parsed"] == ["reverse", "squared"]
    assert out["resolved"] == ["reverse", "squared", True]
    assert out["perm"] == [3, 2, 1, 0, 7, 6, 5, 4]
    assert out["score"] == pytest.approx([4.0, 12.0])
    assert out["export_rc"] == 0

    import onnx

    model = onnx.load(str(onnx_path))
    assert [n.op_type for n in model.graph.node].count("MatMul") == 2
    assert [o.name for o in model.graph.output] == ["y"]


def test_config_names_are_the_registries():
    assert config.METHODS == tuple(METHOD_FACTORIES) == ("identity", "lsa", "channel_swap", "learned")
    assert config.IMPORTANCES == tuple(n for n, i in IMPORTANCE_REGISTRY.items() if i.offered)
    assert config.IMPORTANCES == ("magnitude", "wanda", "ria")
    assert config.CALIBRATED_IMPORTANCES == frozenset({"wanda", "ria"})
    assert cli.MODEL_NAMES == tuple(MODEL_FAMILIES)
    assert cli.MODEL_NAMES[:5] == ("minilm", "smollm2", "vit", "llama", "hf")
    assert all(name.startswith("tiny-") for name in cli.MODEL_NAMES[5:])
    assert cli.MODEL_SIZES == model_sizes() == ("tiny", "small", "b16", "1b")
    with pytest.raises(UsageError, match="channel_swap"):
        config.OptimizeConfig(method="reverse").resolved()
    with pytest.raises(UsageError, match="ria"):
        config.OptimizeConfig(importance="obs").resolved()  # registered for the block-wise mask rule, not offered


def test_family_sizes_are_their_presets():
    from permsparse.models.llama import LLAMA_PRESETS
    from permsparse.models.vit import VIT_PRESETS

    assert model_family("vit").sizes == tuple(VIT_PRESETS)
    assert model_family("llama").sizes == tuple(LLAMA_PRESETS)
    assert {n for n, f in MODEL_FAMILIES.items() if f.dtypes} == {"hf", "smollm2"}
    with pytest.raises(PermsparseError, match="choose one of: minilm, smollm2, vit, llama, hf"):
        model_family("resnet")


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="twice"):
        register_method("lsa")(lambda **kw: None)
    with pytest.raises(ValueError, match="twice"):
        register_importance("wanda", needs="x_norm")(lambda w, s: w)
    with pytest.raises(ValueError, match="twice"):
        register_family("vit")(lambda r: None)
    assert tuple(METHOD_FACTORIES) == config.METHODS  # nothing half-registered
    with pytest.raises(PermsparseError, match="identity, lsa, channel_swap, learned"):
        make_method("reverse")
    with pytest.raises(PermsparseError, match="magnitude, wanda, ria, obs"):
        compute_importance("squared", np.ones((4, 2)))
