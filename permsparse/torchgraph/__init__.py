"""Differentiable PyTorch evaluation of ONNX graphs and blocks of them (what permutation learning, block-wise weight
tuning and sequential calibration run on).

```python
from permsparse.torchgraph import GraphProgram, ProgramConfig, block_inputs

prog = GraphProgram.from_model("model.onnx")                      # whole graph
side = block_inputs("model.onnx", [x_in], [x_out])                 # e.g. the attention mask, RoPE cos/sin
block = GraphProgram.from_model("model.onnx", inputs=[x_in, *side], outputs=[x_out])
w = block.constant(name).clone().requires_grad_()
y = block.run(feeds, overrides={name: w})[x_out]                   # gradients flow to w
```

Invariant: a program's outputs equal onnxruntime's for the same graph and feeds up to floating-point rounding (the
op modules state the semantics they implement); ops outside the table raise a clear error instead of guessing.
"""

from permsparse.torchgraph.ops import OPS, supported_ops, unsupported_ops
from permsparse.torchgraph.program import GraphProgram, ProgramConfig
from permsparse.torchgraph.subgraph import ModelIndex, block_inputs

__all__ = ["OPS", "GraphProgram", "ModelIndex", "ProgramConfig", "block_inputs", "supported_ops", "unsupported_ops"]
