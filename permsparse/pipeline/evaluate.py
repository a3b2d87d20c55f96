"""Quality of a sparse model next to plain N:M, on held-out data (the numbers ``--report`` shows).

Two models are compared with the dense input on the same held-out feeds: the optimized output, and *plain N:M*
(the input's prunable weights masked in their original channel order by the same importance, no permutation, no
reconstruction) — the baseline a user would get without permsparse. Metrics: output cosine and relative error,
mean-pooled sentence cosine for encoders with an attention mask, perplexity for decoders
(:func:`permsparse.data.metrics.evaluate_drift`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from permsparse.pipeline.config import CALIBRATED_IMPORTANCES

log = logging.getLogger(__name__)

HELDOUT_SAMPLES = 64


def plain_nm_model(src: Path, result: Any, dst: Path) -> Path:
    """Write the input with its pruned weights masked by plain N:M (original order, same importance)."""
    import onnx_graphsurgeon as gs

    from permsparse.ir.graph import import_graph
    from permsparse.ir.model import load_model
    from permsparse.ir.save import save_model
    from permsparse.optimizer.importance import masking_score
    from permsparse.passes.names import name_nodes
    from permsparse.passes.sparsify import mask_weight

    cfg = result.config
    plan = result.plan
    x_norms = dict(result.x_norms)
    missing = sorted({plan.weights[n].input for n in result.selected} - set(x_norms))
    if cfg.mask.importance in CALIBRATED_IMPORTANCES and missing:  # block-wise runs keep Hessians, not the dense ‖X‖
        from permsparse.pipeline.learn import input_norms

        x_norms.update(input_norms(src, missing, cfg, progress=False))
    model = load_model(src, check=False)
    graph = import_graph(model, src.parent)
    name_nodes(graph)
    by_const = {plan.weights[n].const: plan.weights[n] for n in result.selected}

    def masker(w):
        def fn(stored: np.ndarray) -> np.ndarray:
            wk = np.asarray(w.k_major(stored), dtype=np.float32)
            x = x_norms.get(w.input)
            imp = masking_score(cfg.mask.importance, wk, x_norm=x, missing="magnitude")
            return mask_weight(w, stored, imp, plan.pattern)[0]
        return fn

    transforms = {c: masker(w) for c, w in by_const.items()}
    save_model(gs.export_onnx(graph), dst, external_data=True, base_dir=src.parent, transform=transforms)
    return dst


def evaluate_quality(src: Path, output: Path, result: Any, work: Path) -> dict[str, dict[str, Any]]:
    """``{"plain": drift, "result": drift}`` of plain N:M and of the output against the dense input."""
    from permsparse.data.feeds import make_feeds
    from permsparse.data.metrics import evaluate_drift

    cfg = result.config
    feeds = make_feeds(str(src), None, samples=HELDOUT_SAMPLES, batch_size=8,
                       seq_len=cfg.calibration.seq_len, tokenizer_dir=cfg.calibration.tokenizer, seed=cfg.seed + 1, split="heldout")
    plain = plain_nm_model(src, result, work / "plain.onnx")
    return {
        "plain": evaluate_drift(str(src), str(plain), feeds, progress=False),
        "result": evaluate_drift(str(src), str(output), feeds, progress=False),
        "heldout": {"examples": sum(int(np.shape(next(iter(f.values())))[0]) for f in feeds),
                    "source": "built-in held-out split (text mix of wiki, news, film, manuals, comments; random images for image models)"},
    }
