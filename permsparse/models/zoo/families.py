"""``export tiny-<family>``: the seeded tiny models of :mod:`permsparse.models.families` (Gemma, Qwen, Phi-3, GPT-2,
BERT, RoBERTa, CLIP, ...), built offline from ``transformers`` configs, for trying a family's graph shape without a
checkpoint. Each family of that module is registered here under ``tiny-<name>``; ``--seed`` picks the weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from permsparse.models.families import FAMILIES, build_family_module
from permsparse.models.registry import ExportRequest, register

if TYPE_CHECKING:
    from permsparse.models.hf import LoadedModel


def _loader(name: str):
    def load(request: ExportRequest) -> LoadedModel:
        return build_family_module(name, seed=request.seed)

    return load


for _name, _family in FAMILIES.items():
    register(f"tiny-{_name}", summary=f"seeded 2-layer {_family.what or _name} ({_family.config})")(_loader(_name))
