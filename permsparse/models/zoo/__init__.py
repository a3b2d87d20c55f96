"""The models ``permsparse export`` offers, one module per family, each registering itself in
:data:`permsparse.models.registry.MODEL_FAMILIES`; imported here explicitly, in the order the CLI lists them.
Nothing here imports torch: each family's loader imports its model code when it runs."""

from permsparse.models.registry import (
    EXPORTERS,
    MODEL_FAMILIES,
    model_family,
    model_sizes,
)

# The order of these imports is the order the CLI lists the families.
# isort: off
from permsparse.models.zoo import minilm, smollm2, vit, llama, hf, families  # noqa: F401  (each registers)
# isort: on

__all__ = ["EXPORTERS", "MODEL_FAMILIES", "model_family", "model_sizes"]
