"""``export vit``: a seeded ViT (:mod:`permsparse.models.vit`); sizes are its presets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from permsparse.models.registry import ExportRequest, register

if TYPE_CHECKING:
    from permsparse.models.hf import LoadedModel

#: The keys of :data:`permsparse.models.vit.VIT_PRESETS` (tests/test_models.py holds them equal).
SIZES = ("tiny", "small", "b16")


@register("vit", sizes=SIZES, summary="seeded ViT")
def load(request: ExportRequest) -> LoadedModel:
    from permsparse.models.hf import LoadedModel
    from permsparse.models.vit import build_vit, vit_config, vit_example_inputs

    cfg = vit_config(request.size)
    return LoadedModel(build_vit(cfg, request.seed), vit_example_inputs(cfg, batch=2, seed=request.seed),
                       {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}, ["logits"])
