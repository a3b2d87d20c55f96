"""``export llama``: a seeded LLaMA-style decoder (:mod:`permsparse.models.llama`); sizes are its presets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from permsparse.models.registry import ExportRequest, register

if TYPE_CHECKING:
    from permsparse.models.hf import LoadedModel

#: The keys of :data:`permsparse.models.llama.LLAMA_PRESETS` (tests/test_models.py holds them equal).
SIZES = ("tiny", "small", "1b")


@register("llama", sizes=SIZES, summary="seeded LLaMA-style decoder")
def load(request: ExportRequest) -> LoadedModel:
    from permsparse.models.hf import LoadedModel
    from permsparse.models.llama import build_llama, llama_config, llama_example_inputs

    cfg = llama_config(request.size)
    return LoadedModel(build_llama(cfg, request.seed), llama_example_inputs(cfg, batch=2, seq=16, seed=request.seed),
                       {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}, ["logits"])
