"""Recipes: ``<output>.recipe.json`` records how a sparse model was made, and ``optimize --recipe`` replays it.

A recipe holds every option, the calibration source, the seed, the input's name and hash, and each unit's
permutation (unit name -> indices). Replaying it on a re-export of the same model (same graph, weights possibly
re-trained) skips learning: the recorded permutations are checked against the new model's units (same names,
sizes and block constraints) and folded as recorded; reconstruction and masking run as recorded.
:func:`replay_config` turns a recipe into the config of the replay (``permsparse.replay`` / ``optimize --recipe``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from permsparse.errors import PermsparseError, UsageError
from permsparse.ir.save import atomic_write_text

RECIPE_VERSION = 1

log = logging.getLogger(__name__)


def recipe_path(output: str | os.PathLike[str]) -> Path:
    p = Path(output)
    return p.with_name(p.stem + ".recipe.json")


def write_recipe(result: Any, src: Path, dst: Path) -> Path:
    from permsparse import __version__

    cfg = result.config
    doc = {
        "recipe_version": RECIPE_VERSION,
        "permsparse": __version__,
        "input": str(src.name),
        "input_sha256": result.input_sha256,
        "options": cfg.to_dict(),
        "calibration": cfg.calibration.source or ("built-in text mix (wiki, news, film, manuals, comments)"
                                                  if cfg.needs_calibration else None),
        "units": {name: [int(x) for x in perm] for name, perm in result.perms.items()},
    }
    return atomic_write_text(recipe_path(dst), json.dumps(doc, indent=1) + "\n")


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe's options and permutations; raises a one-line error for anything that is not a recipe."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--recipe {p}: no such file")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PermsparseError(f"--recipe {p}: not a JSON recipe ({exc})") from None
    if not isinstance(doc, dict) or doc.get("recipe_version") != RECIPE_VERSION or not isinstance(doc.get("units"), dict):
        raise PermsparseError(f"--recipe {p}: not a permsparse recipe (version {RECIPE_VERSION})")
    return doc


#: Options that decide the units and their sizes: a replay that changes one of them cannot use the recorded
#: permutations (the units would differ), so a different value given with the recipe is a usage error.
STRUCTURAL_OPTIONS = ("policy", "pattern", "prune_head", "exclude")
#: Options of the run, not of the result: never taken from a recipe (the replaying machine decides).
RUNTIME_OPTIONS = ("workers", "cluster", "work_dir", "budget_s", "progress", "evaluate", "recipe_perms", "check",
                   "device")


def replay_config(recipe: str | os.PathLike[str] | dict[str, Any], config: Any = None) -> Any:
    """The :class:`~permsparse.pipeline.config.OptimizeConfig` that replays ``recipe`` (a path or a read recipe).

    Every recorded option of the result is taken from the recipe (method, importance, reconstruction, calibration,
    seed, ...) so the replay makes the same model; options given in ``config`` (not ``None``) win, except the ones that
    decide the units (:data:`STRUCTURAL_OPTIONS`), which must agree with the recipe. Run-time options (workers,
    cluster, work dir, budget, check) come from ``config`` only. The recorded permutations go to ``recipe_perms``.
    """
    from dataclasses import fields, replace

    from permsparse.pipeline.config import OptimizeConfig

    doc = read_recipe(recipe) if not isinstance(recipe, dict) else recipe
    where = recipe if not isinstance(recipe, dict) else "the recipe"
    given = config or OptimizeConfig()
    recorded = doc.get("options") or {}
    if not isinstance(recorded, dict):
        raise PermsparseError(f"--recipe {where}: its 'options' are not a JSON object")
    names = {f.name for f in fields(OptimizeConfig)}
    unknown = sorted(set(recorded) - names)
    if unknown:
        log.warning("--recipe %s: ignoring options this version does not know: %s", where, ", ".join(unknown))
    opts: dict[str, Any] = {k: v for k, v in recorded.items() if k in names and k not in RUNTIME_OPTIONS}
    if opts.get("exclude") is not None:
        opts["exclude"] = tuple(opts["exclude"])
    if opts.get("shapes"):
        from permsparse.ir.shapes import parse_shapes

        opts["shapes"] = parse_shapes(opts["shapes"])
    if opts.get("learned") is not None:
        from permsparse.optimizer.learned import LearnedConfig

        opts["learned"] = LearnedConfig(**opts["learned"])
    for name in STRUCTURAL_OPTIONS:
        mine = getattr(given, name)
        if mine is None or name not in opts:
            continue
        theirs = opts[name]
        a, b = (str(mine), str(theirs)) if name == "pattern" else (mine, theirs)
        if name == "exclude":
            a, b = tuple(mine), tuple(theirs or ())
        if name == "prune_head":
            a, b = bool(mine), bool(theirs)
        if a != b:
            raise UsageError(f"--{name.replace('_', '-')} {_show(mine)} contradicts the recipe ({_show(theirs)}): its "
                             f"permutations were made for {_show(theirs)}; drop the option, or run without --recipe")
    for f in fields(OptimizeConfig):
        v = getattr(given, f.name)
        if v is not None and f.name != "recipe_perms":
            opts[f.name] = v
    units = doc.get("units")
    if not isinstance(units, dict):
        raise PermsparseError(f"--recipe {where}: it has no 'units' object (the permutation of each unit); give a "
                              "recipe.json written by permsparse optimize")
    opts["recipe_perms"] = {str(k): v for k, v in units.items()}
    return replace(OptimizeConfig(), **opts)


def check_input(doc: dict[str, Any], digest: str, model: str | os.PathLike[str]) -> None:
    """Warn when the recipe was made from another file (a re-export with new weights is allowed)."""
    want = doc.get("input_sha256")
    if want and digest and want != digest:
        log.warning("the recipe was written for %s (sha256 %s…), %s differs (%s…): replaying its permutations on "
                    "these weights", doc.get("input", "another file"), str(want)[:12], Path(model).name, digest[:12])


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)
