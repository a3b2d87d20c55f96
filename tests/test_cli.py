"""The command line as a user types it: every README example and option, recipe replay, the report, usage errors
(one line, one JSON object under --json), a seeded fuzz of argument spellings, and no file left in $TMPDIR or beside
the output after success, failure, SIGINT, SIGTERM and SIGKILL followed by a rerun."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import sha256

import permsparse
from permsparse.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FAST = ["--method", "identity", "--reconstruct", "none", "-q", "--workers", "1"]
VERBS = ("optimize", "inspect", "build", "bench", "export", "recover")


def _one_line_error(err: str) -> None:
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err


def _json_doc(out: str) -> dict:
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) == 1, out
    return json.loads(lines[0])


# ------------------------------------------------------------------------------------------------ README


def _verb_options() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    out = {"": {s for a in parser._actions for s in a.option_strings}}
    for name, p in sub.choices.items():
        out[name] = {s for a in p._actions for s in a.option_strings}
    return out


def test_every_option_the_readme_names_exists():
    """Each ``--option`` in the README is accepted by a verb, or by the bench script the README runs it with."""
    options = _verb_options()
    known = set().union(*options.values())
    bench_src = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "bench").rglob("*.py"))
    shell_src = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "bench").rglob("*.sh"))
    named = set(re.findall(r"(?<![\w-])(--[a-zA-Z][a-zA-Z0-9-]*)", README))
    missing = sorted(o for o in named if o not in known and f'"{o}"' not in bench_src
                     and not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", shell_src))
    assert not missing, f"the README names options nothing accepts: {missing}"
    assert {"--recipe", "--work-dir", "--report", "--cluster", "--pattern", "--policy"} <= options["optimize"]


def test_readme_verb_lines_parse():
    """The command block at the top of the README parses as written (paths are only parsed, nothing runs)."""
    block = re.search(r"```\n(permsparse optimize.*?)```", README, flags=re.DOTALL)
    assert block is not None
    parser = build_parser()
    lines = [ln.split("#")[0].split() for ln in block.group(1).splitlines() if ln.startswith("permsparse ")]
    assert {ln[1] for ln in lines} == set(VERBS)
    for words in lines:
        if words[1] == "export":  # "minilm|smollm2|vit|llama|hf": each choice
            for name in words[2].split("|"):
                name = name.replace("<family>", "gemma3")  # tiny-<family>: one of the registered families
                args = parser.parse_args([*words[1:2], name, *words[3:]])
                assert args.model == name
            continue
        args = parser.parse_args(words[1:])
        assert args.command == words[1]


def test_readme_commands_run(tmp_path, exported, capsys):
    """optimize (defaults: block-wise SparseGPT), inspect, bench --backend ort, in the README's spelling."""
    src = exported("llama", "legacy")
    out = tmp_path / "model.sparse.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--workers", "1", "-q"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and (tmp_path / "model.sparse.recipe.json").exists()
    assert "14/14 valid 2:4" in text
    assert main(["inspect", str(out), "--json"]) == 0
    doc = _json_doc(capsys.readouterr().out)
    assert doc["ok"] and doc["summary"]["nm_valid"] == 14
    assert main(["bench", str(out), "--dense", str(src), "--iters", "2", "--warmup", "0", "--no-plot",
                 "--json"]) == 0
    assert _json_doc(capsys.readouterr().out)["ok"]


@pytest.mark.parametrize("spelling", [
    ["--shapes", "input_ids:1x8"],
    ["--shapes", "input_ids:[1,8]"],
    ["--shapes=input_ids:1x8"],
    ["--input-shapes", "input_ids:[1,8]"],
    ["--shapes", "input_ids:1x4,1x8,2x16"],
    ["--minShapes", "input_ids:1x4", "--optShapes", "input_ids:1x8", "--maxShapes", "input_ids:2x16"],
])
def test_shape_spellings_before_and_after_the_model(tmp_path, exported, capsys, spelling):
    """Every README spelling of shapes works, also before the model (``--shapes`` takes several values)."""
    src = exported("llama", "legacy")
    assert main(["inspect", str(src), *spelling, "--json"]) == 0
    after = _json_doc(capsys.readouterr().out)
    assert main(["inspect", *spelling, str(src), "--json"]) == 0
    assert _json_doc(capsys.readouterr().out) == after


def test_options_the_readme_names_run(tmp_path, exported, capsys):
    """--pattern 4:8, --policy, --prune-head, --exclude, --no-mask, --work-dir, --log-file, --calib with the
    per-weight path on the tiny LLaMA: each runs and does what it says."""
    src = exported("llama", "legacy")
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    log_file = tmp_path / "run.log"
    out = tmp_path / "a.onnx"
    argv = ["optimize", str(src), "-o", str(out), "--method", "lsa", "--reconstruct", "none", "--pattern", "4:8",
            "--policy", "global", "--prune-head", "--exclude", "layers\\.1\\.mlp", "--work-dir", str(tmp_path / "w"),
            "--log-file", str(log_file), "--calib", str(calib), "--calib-samples", "8", "--workers", "1", "--json"]
    assert main(argv) == 0
    doc = _json_doc(capsys.readouterr().out)
    assert doc["ok"] and doc["pattern"] == "4:8" and doc["weights_pruned"] == 15 - 3  # 14 + lm_head, 3 excluded
    assert doc["nm_valid"] == doc["weights_pruned"]
    # the resolved options, as the recipe records them
    recipe = json.loads(out.with_name("a.recipe.json").read_text())
    assert doc["config"] == recipe["options"]
    assert (doc["config"]["pattern"], doc["config"]["policy"], doc["config"]["calib_samples"]) == ("4:8", "global", 8)
    assert doc["config"]["damp"] == 0.1 and doc["config"]["exclude"] == ["layers\\.1\\.mlp"]
    assert log_file.stat().st_size > 0 and any((tmp_path / "w").rglob("*"))
    dense = tmp_path / "d.onnx"
    assert main(["optimize", str(src), "-o", str(dense), *FAST, "--no-mask", "--json"]) == 0
    assert _json_doc(capsys.readouterr().out)["nm_valid"] == 0


# ------------------------------------------------------------------------------------------------ recipe


def test_recipe_replay_through_the_cli_and_the_api(tmp_path, exported, capsys):
    """A recipe written by a default run replays to the same bytes from the CLI, ``permsparse.replay`` and
    ``permsparse.optimize(recipe=)``; an option that changes the units is refused in one line."""
    src = exported("llama", "legacy")
    first = tmp_path / "a" / "m.onnx"
    assert main(["optimize", str(src), "-o", str(first), "--workers", "1", "--calib-samples", "8", "-q"]) == 0
    recipe = first.with_name("m.recipe.json")
    doc = json.loads(recipe.read_text())
    assert doc["options"]["calib_samples"] == 8 and doc["units"]
    second = tmp_path / "b" / "m.onnx"
    assert main(["optimize", str(src), "-o", str(second), "--recipe", str(recipe), "--workers", "1", "-q"]) == 0
    assert sha256(second) == sha256(first)
    third = tmp_path / "c" / "m.onnx"
    result = permsparse.replay(src, third, recipe, permsparse.OptimizeConfig(workers=1, progress=False))
    assert sha256(third) == sha256(first) and result.config.calibration.samples == 8
    fourth = tmp_path / "d" / "m.onnx"
    permsparse.optimize(src, fourth, permsparse.OptimizeConfig(workers=1, progress=False), recipe=recipe)
    assert sha256(fourth) == sha256(first)
    capsys.readouterr()
    code = main(["optimize", str(src), "-o", str(tmp_path / "e" / "m.onnx"), "--recipe", str(recipe),
                 "--policy", "global", "--json"])
    captured = capsys.readouterr()
    _one_line_error(captured.err)
    assert code == 2 and "contradicts the recipe" in captured.err and not (tmp_path / "e" / "m.onnx").exists()
    assert _json_doc(captured.out)["exit_code"] == 2
    for bad, message in ((tmp_path / "nope.json", "no such file"), (src, "not a JSON recipe")):
        code = main(["optimize", str(src), "-o", str(tmp_path / "f.onnx"), "--recipe", str(bad)])
        err = capsys.readouterr().err
        _one_line_error(err)
        assert code in (1, 2) and message in err


# ------------------------------------------------------------------------------------------------ report


def test_report_tells_one_consistent_story(tmp_path, exported, capsys):
    """Block-wise run: the summary's permutation objective is the weighted mean of the unit table, every unit keeps
    at least plain N:M on its score, and the report shows block errors, not kept |W| of rebuilt weights."""
    src = exported("llama", "legacy")
    rep = tmp_path / "rep"
    assert main(["optimize", str(src), "-o", str(tmp_path / "m.onnx"), "--workers", "1", "--calib-samples", "8",
                 "--report", str(rep), "-q"]) == 0
    text = capsys.readouterr().out
    assert "importance kept per weight" not in text
    line = next(x for x in text.splitlines() if x.startswith("permutation objective"))
    plain, permuted = (float(v) for v in re.findall(r"\d\.\d{4}", line)[-2:])
    md = (rep / "report.md").read_text()
    rows = [r.split("|") for r in md.splitlines() if r.startswith("| `")]
    assert rows, md
    weights = np.array([int(r[2]) for r in rows])
    plains, perms = np.array([float(r[5]) for r in rows]), np.array([float(r[6]) for r in rows])
    assert (perms >= plains - 1e-4).all()
    assert abs(np.average(plains, weights=weights) - plain) < 2e-4
    assert abs(np.average(perms, weights=weights) - permuted) < 2e-4 and permuted >= plain
    assert "block output error" in md and (rep / "blocks.png").stat().st_size > 1000
    assert "not what the run optimized" in md and "Retained importance per weight" not in md
    assert "| model | output cosine |" in md  # the held-out evaluation


def test_interrupt_during_report_evaluation_says_what_was_written(tmp_path, exported, capsys, monkeypatch):
    from permsparse.pipeline import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_quality", interrupted)
    src = exported("llama", "legacy")
    out = tmp_path / "m.onnx"
    code = main(["optimize", str(src), "-o", str(out), *FAST, "--report", str(tmp_path / "rep"), "--json"])
    captured = capsys.readouterr()
    _one_line_error(captured.err)
    assert code == 130 and "nothing written" not in captured.err
    assert f"{out} and m.recipe.json were written" in captured.err
    onnx.checker.check_model(str(out))
    assert (tmp_path / "m.recipe.json").exists() and not (tmp_path / "rep" / "report.md").exists()
    assert _json_doc(captured.out)["exit_code"] == 130
    assert not list(tmp_path.glob(".permsparse-*"))


# ------------------------------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize("argv, message", [
    (["optimize", "{src}", "-o", "{out}", "--pattern", "abc"], "--pattern"),
    (["optimize", "{src}", "-o", "{out}", "--bogus"], "unrecognized arguments: --bogus"),
    (["optimize", "{src}"], "-o/--output"),
    (["inspect"], "model"),
    (["frobnicate"], "invalid choice"),
    (["inspect", "{src}", "--shapes", "input_ids:0x8"], "positive"),
    (["inspect", "{src}", "--shapes", "input_ids"], "NAME:SHAPE"),
    (["optimize", "{src}", "-o", "{out}", "--method", "magic"], "invalid choice"),
    (["optimize", "{src}", "-o", "{out}", "--workers", "0"], ">= 1"),
    (["optimize", "{src}", "-o", "{out}", "--log-file", "{file}/x.log"], "is a file, not a folder"),
    (["optimize", "{src}", "-o", "{out}", "--report", "{file}/rep"], "is a file, not a folder"),
    (["optimize", "{src}", "-o", "{file}/o.onnx", *FAST], "is a file, not a folder"),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_usage_errors_are_one_line_and_json(tmp_path, exported, capsys, argv, message, as_json):
    src = exported("llama", "legacy")
    (tmp_path / "afile").write_text("x")
    subst = {"{src}": str(src), "{out}": str(tmp_path / "o.onnx"), "{file}": str(tmp_path / "afile")}
    argv = [subst.get(a, a.replace("{file}", str(tmp_path / "afile"))) for a in argv]
    code = main([*argv, "--json"] if as_json else argv)
    captured = capsys.readouterr()
    _one_line_error(captured.err)
    assert message in captured.err and code in (1, 2), (code, captured.err)
    if as_json:
        doc = _json_doc(captured.out)
        assert doc["ok"] is False and doc["exit_code"] == code and message in doc["error"]
    else:
        assert captured.out == ""
    assert not (tmp_path / "o.onnx").exists()


_FLAGS = {
    "--method": ["lsa", "identity", "LSA", "magic", ""],
    "--policy": ["local", "global", "fold", "none"],
    "--pattern": ["2:4", "4:8", "1:2", "4:2", "2/4", "abc", "0:4", ""],
    "--importance": ["magnitude", "wanda", "ria", "abs"],
    "--reconstruct": ["none", "sparsegpt", "obs"],
    "--objective": ["importance", "output", "block", "x"],
    "--workers": ["1", "0", "-1", "two", "1.5"],
    "--budget-s": ["10", "0", "-5", "inf", "nan", "x"],
    "--rtol": ["1e-4", "0", "2", "x"],
    "--damp": ["0.1", "-1", "1", "x"],
    "--calib-samples": ["8", "0", "x"],
    "--finetune-epochs": ["0", "2", "-1"],
    "--cluster": ["local", "mars", "ray://"],
    "--check": ["auto", "whole", "blocks", "half"],
    "--seed": ["0", "7", "-3", "x"],
    "--shapes": ["input_ids:1x8", "input_ids:[1,8]", "input_ids:0x8", "input_ids:1x8,1x4,1x16", "input_ids",
                 ":1x8", "input_ids:axb"],
    "--exclude": ["lm_head", "(", "layers\\.0"],
}
_SWITCHES = ["-q", "-v", "-vv", "--json", "--no-mask", "--prune-head", "--sequential", "--no-sequential", "--bogus",
             "--no-such-flag=1"]


def test_fuzz_argument_spellings(tmp_path, exported, capsys, monkeypatch):
    """300 seeded random command lines for optimize (the API replaced by a stub that records the config): each is a
    one-line error with exit 2, or reaches the API with a config that resolves; --json always prints one object."""
    from permsparse import api
    from permsparse.errors import PermsparseError

    reached: list = []

    def stub(model, output, config=None, *, recipe=None):
        reached.append(config.resolved())
        raise PermsparseError("stub: stopped before any work")

    monkeypatch.setattr(api, "optimize", stub)
    src = str(exported("llama", "legacy"))
    rng = random.Random(20261204)
    codes: dict[int, int] = {}
    for i in range(300):
        words: list[str] = []
        for flag in rng.sample(sorted(_FLAGS), rng.randint(0, 4)):
            value = rng.choice(_FLAGS[flag])
            words += [f"{flag}={value}"] if rng.random() < 0.3 else [flag, value]
        words += rng.sample(_SWITCHES, rng.randint(0, 2))
        head = ["optimize", src, "-o", str(tmp_path / f"o{i}.onnx")]
        if rng.random() < 0.2:
            head = ["optimize", "-o", str(tmp_path / f"o{i}.onnx"), src]  # the model after the options
        argv = [*head, *words]
        rng.shuffle(argv) if rng.random() < 0.05 else None  # a few scrambled lines
        before = len(reached)
        code = main(argv)
        captured = capsys.readouterr()
        codes[code] = codes.get(code, 0) + 1
        assert "-vv" in argv or "Traceback" not in captured.err, argv  # -vv asks for the traceback
        assert code in (1, 2), (argv, code, captured.err)
        assert captured.err.splitlines()[-1].startswith("error: "), (argv, captured.err)
        if "-v" not in argv and "-vv" not in argv:
            _one_line_error(captured.err)
        if code == 1:
            assert "stub: stopped" in captured.err and len(reached) == before + 1, (argv, captured.err)
        if "--json" in argv:
            doc = _json_doc(captured.out)
            assert doc["ok"] is False and doc["exit_code"] == code
        assert not (tmp_path / f"o{i}.onnx").exists()
    assert codes.get(1, 0) >= 30 and codes.get(2, 0) >= 30, codes  # both kinds were exercised


# ------------------------------------------------------------------------------------------------ leftovers


def _env(tmpdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(tmpdir)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("ORT_DISABLE_TELEMETRY", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _cli(args: list[str], tmpdir: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "permsparse.cli", *args], env=_env(tmpdir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.slow  # two interpreter starts and a block-wise run with tuning: ~50 s on 2 contended cores
def test_no_leftovers_after_success_and_failure(tmp_path, exported):
    """A default (block-wise) optimize and a failing one leave nothing in $TMPDIR, and beside the output only the
    model and its recipe (no onnxruntime session file, no torch inductor folder, no temporary folders)."""
    src = exported("llama", "legacy")
    tmpdir, out_dir = tmp_path / "tmp", tmp_path / "out"
    tmpdir.mkdir()
    proc = _cli(["optimize", str(src), "-o", str(out_dir / "m.onnx"), "--calib-samples", "8", "--finetune-epochs",
                 "1", "-q"], tmpdir)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _listing(tmpdir) == []
    assert _listing(out_dir) == ["m.onnx", "m.recipe.json"]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    proc = _cli(["optimize", str(bad), "-o", str(out_dir / "x.onnx"), "-q"], tmpdir)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.startswith("error: ")
    assert _listing(tmpdir) == [] and _listing(out_dir) == ["m.onnx", "m.recipe.json"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_no_leftovers_after_a_signal(tmp_path, exported, sig):
    """Signalled mid-run: SIGINT/SIGTERM exit 130 and leave nothing; after SIGKILL the next run sweeps what the killed
    one left (its pid is gone) and finishes with nothing left over."""
    src = exported("llama", "legacy")
    tmpdir, out_dir = tmp_path / "tmp", tmp_path / "out"
    tmpdir.mkdir()
    args = ["optimize", str(src), "-o", str(out_dir / "m.onnx"), "--calib-samples", "8", "--finetune-epochs", "2",
            "--workers", "2"]
    proc = _cli(args, tmpdir)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".permsparse-") for p in out_dir.glob("*")):
        time.sleep(0.1)  # the run's work folder beside the output: it is inside optimize now
    time.sleep(random.Random(int(sig)).uniform(0.5, 2.0))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    finished = proc.returncode == 0
    if sig != signal.SIGKILL:
        assert finished or (proc.returncode == 130 and "interrupted" in err), (proc.returncode, err)
        assert _listing(tmpdir) == []
        assert _listing(out_dir) in ([], ["m.onnx", "m.recipe.json"])
        return
    stale = tmpdir / f"permsparse-solve-{proc.pid}-torchinductor"  # as a killed run leaves it, whatever it reached
    stale.mkdir(exist_ok=True)
    (stale / "x").write_text("x")
    proc = _cli(["optimize", str(src), "-o", str(out_dir / "m.onnx"), *FAST], tmpdir)  # sweeps the killed run's
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _listing(tmpdir) == []
    assert _listing(out_dir) == ["m.onnx", "m.recipe.json"]


# ------------------------------------------------------------------------------------------------ small things


def test_inspect_verbose_adds_constants_and_closures(exported, capsys):
    src = exported("llama", "legacy")
    assert main(["inspect", str(src)]) == 0
    plain = capsys.readouterr().out
    assert main(["inspect", str(src), "-v"]) == 0
    verbose = capsys.readouterr().out
    assert plain.splitlines()[0].startswith("weight ") and "..." not in plain  # header first, no cut column
    assert "closures:" in verbose and "constant" in verbose.splitlines()[0] and "closures:" not in plain
    assert len(verbose.splitlines()) > len(plain.splitlines())


def test_status_lines_on_a_terminal_only(exported, tmp_path, capsys, monkeypatch):
    """On a terminal, each stage says what it does as it starts; -q, --json and captured stderr stay silent."""
    src = exported("llama", "legacy")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["optimize", str(src), "-o", str(tmp_path / "a.onnx"), *[a for a in FAST if a != "-q"]]) == 0
    err = capsys.readouterr().err
    status = [ln for ln in err.splitlines() if ln.startswith("permsparse: ")]
    assert any("probe: shapes of every tensor" in ln for ln in status), err
    assert any("fold: folding the permutations" in ln and "fold check" in ln for ln in status)
    assert not any("done in" in ln for ln in status)
    assert main(["optimize", str(src), "-o", str(tmp_path / "b.onnx"), *FAST]) == 0
    assert "permsparse: " not in capsys.readouterr().err
