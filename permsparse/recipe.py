"""Recipes: ``<output>.recipe.json`` records how a sparse model was made, and ``optimize --recipe`` replays it.

A recipe holds every option, the calibration source, the seed, the input's name and hash, and each unit's
permutation (unit name -> indices). Replaying it on a re-export of the same model (same graph, weights possibly
re-trained) skips learning: the recorded permutations are checked against the new model's units (same names,
sizes and block constraints) and folded as recorded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from permsparse.errors import PermsparseError, UsageError
from permsparse.ir.save import atomic_write_text

RECIPE_VERSION = 1


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
        "calibration": cfg.calib or ("built-in text mix (wiki, news, film, manuals, comments)" if cfg.needs_calibration else None),
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
