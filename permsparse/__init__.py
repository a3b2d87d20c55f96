"""permsparse: 2:4 sparsity for ONNX Transformers with learned channel permutations folded into the weights."""

from permsparse.errors import PermsparseError

__version__ = "0.1.0"
__all__ = ["PermsparseError", "__version__"]
