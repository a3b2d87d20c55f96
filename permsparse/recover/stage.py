"""Recovery as the last stage of ``optimize``: recover the written model from the input (its teacher), in place.

The written sparse model ``dst`` is the student and the input ``src`` the teacher; the recovered model is written under
the same file name in a temporary folder beside ``dst`` (so an external data file keeps its name) and then renamed
over ``dst``; the recipe beside ``dst`` gains a ``recovery`` entry (steps, tokens, loss curve, data hash).

Invariant: ``dst`` is replaced only by a model that passed recovery's own checks (same graph, N:M, not worse on the
held-out slice than the one-shot result); on any failure the one-shot model stays as written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from permsparse.pipeline.config import ResolvedConfig

log = logging.getLogger(__name__)


def recover_output(src: Path, dst: Path, cfg: ResolvedConfig) -> dict:
    """Recover ``dst`` in place from teacher ``src`` with ``cfg.recover``; returns the recovery's facts."""
    from permsparse.ir.save import atomic_write_text, data_file_of, work_dir
    from permsparse.recover import recover
    from permsparse.recover.config import RecoverConfig

    rc = cfg.recover if isinstance(cfg.recover, RecoverConfig) else RecoverConfig(**dict(cfg.recover))
    # what recovery does not say it takes from optimize's own options (text, tokenizer, progress bars, --device)
    inherited = {"calib": cfg.calibration.source, "tokenizer": cfg.calibration.tokenizer, "progress": cfg.progress,
                 "device": cfg.device}
    rc = replace(rc, **{k: v for k, v in inherited.items() if getattr(rc, k) is None and v is not None})
    with work_dir(dst.parent, "recover-out") as tmp:
        out = tmp / dst.name
        res = recover(dst, src, out, rc)
        if data_file_of(out).exists():
            os.replace(data_file_of(out), data_file_of(dst))
        os.replace(out, dst)
    facts = res.to_dict()
    facts["output"] = str(dst)
    from permsparse.pipeline.recipe import recipe_path

    recipe = recipe_path(dst)
    if recipe.exists():
        doc = json.loads(recipe.read_text(encoding="utf-8"))
        doc["recovery"] = facts
        atomic_write_text(recipe, json.dumps(doc, indent=1) + "\n")
    return facts


__all__ = ["recover_output"]
