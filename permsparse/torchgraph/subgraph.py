"""Finding the nodes of an ONNX (sub)graph: what computes given outputs from given inputs, and a block's side inputs.

:class:`ModelIndex` indexes a model's graph once (producer of every tensor, initializers, Constant nodes).
:meth:`ModelIndex.walk` walks back from the outputs and collects the nodes that compute them, stopping at the given
inputs and at constants. :func:`block_inputs` answers "which other tensors does the block between these residual
tensors read?" (an attention mask, RoPE cos/sin, a shape computed elsewhere).

Invariant: ``walk(inputs, outputs)`` returns exactly the nodes on some path from a given input or a constant to an
output, in graph (topological) order, with no path crossing a given input; every tensor those nodes read is a given
input, a constant, an output of a returned node, or listed in ``missing``. ``block_inputs`` lists the tensors a walk
reaches that neither depend on the given inputs nor can be computed from them and constants alone, taking the first
such tensor on each path (the one the block itself reads), so a program built with them as extra inputs contains only block-local nodes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from permsparse.errors import PermsparseError
from permsparse.ir.external import read_external
from permsparse.torchgraph.registry import constant_node_value

log = logging.getLogger(__name__)


def load_model(model: onnx.ModelProto | str | os.PathLike[str], base_dir: str | os.PathLike[str] | None):
    """``(model, base_dir)``: a path is loaded without its external data (read lazily from ``base_dir``, default
    the model's folder); model-local functions are inlined so every node is a plain op."""
    if isinstance(model, onnx.ModelProto):
        proto, base = model, Path(base_dir) if base_dir is not None else None
    else:
        path = Path(model)
        if not path.is_file():
            raise PermsparseError(f"torchgraph: ONNX model {str(path)!r} does not exist; pass an existing .onnx file.")
        proto = onnx.load(str(path), load_external_data=False)
        base = Path(base_dir) if base_dir is not None else path.parent
    if proto.functions:
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
    return proto, base


class ModelIndex:
    """Producers, initializers and Constant nodes of one graph (built once, O(nodes))."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None = None) -> None:
        graph = model.graph
        self.graph = graph
        self.base_dir = base_dir
        self.opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        self.producer: dict[str, int] = {}
        for i, node in enumerate(graph.node):
            for out in node.output:
                if out and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    self.constant_nodes[out] = node
                elif out:
                    self.producer[out] = i
        self.graph_inputs = [v.name for v in graph.input if v.name not in self.initializers]
        self.graph_outputs = [v.name for v in graph.output]

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes

    def known(self, name: str) -> bool:
        return name in self.producer or self.is_constant(name) or name in self.graph_inputs

    def check_names(self, names: Collection[str], what: str) -> None:
        unknown = [n for n in names if not self.known(n)]
        if unknown:
            raise PermsparseError(
                f"torchgraph: {what} {unknown[:5]} are not tensors of this graph (no node produces them and they are "
                "neither graph inputs nor constants); check the names, e.g. with onnx.load(path).graph.node."
            )

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output (external data read now, from ``base_dir``)."""
        tensor = self.initializers.get(name)
        if tensor is not None:
            uses_external = tensor.data_location == onnx.TensorProto.EXTERNAL
            if uses_external and self.base_dir is None:
                raise PermsparseError(
                    f"torchgraph: initializer {name!r} is stored as external data; pass base_dir= (the folder of "
                    "the .onnx file) or the model's path instead of a ModelProto."
                )
            try:
                if uses_external:  # relative to base_dir, or permsparse's own spill files by absolute path
                    return read_external(tensor, self.base_dir, mmap=False)
                return numpy_helper.to_array(tensor)
            except (OSError, ValueError) as exc:
                raise PermsparseError(
                    f"torchgraph: cannot read initializer {name!r} ({exc}); check that the external data file lies "
                    f"beside the model in {self.base_dir}."
                ) from exc
        node = self.constant_nodes.get(name)
        return None if node is None else constant_node_value(node)

    def walk(
        self, inputs: Collection[str], outputs: Sequence[str], *, computable: Collection[str] | None = None
    ) -> tuple[list[onnx.NodeProto], list[str]]:
        """``(nodes, missing)``: the nodes computing ``outputs`` from ``inputs`` and constants, in graph order, and
        the tensors reached that are neither (graph inputs not given; with ``computable``, anything outside it)."""
        given = set(inputs)
        needed: set[int] = set()
        missing: list[str] = []
        seen: set[str] = set()
        stack = [o for o in reversed(outputs)]
        while stack:
            name = stack.pop()
            if not name or name in seen:
                continue
            seen.add(name)
            if name in given or self.is_constant(name):
                continue
            idx = self.producer.get(name)
            if idx is None or (computable is not None and name not in computable):
                missing.append(name)
                continue
            if idx not in needed:
                needed.add(idx)
                stack.extend(reversed(self.graph.node[idx].input))
        order = {n: i for i, n in enumerate(self.graph_inputs)}
        missing.sort(key=lambda n: (self.producer.get(n, -1), order.get(n, 0)))
        return [self.graph.node[i] for i in sorted(needed)], missing

    def block_region(self, inputs: Collection[str]) -> set[str]:
        """The tensors that depend on ``inputs`` or are computable from them and constants alone (one forward
        sweep in graph order): the inside of a block that starts at ``inputs``."""
        given = set(inputs)
        ok = given | set(self.initializers) | set(self.constant_nodes)
        inside = set(given)
        for node in self.graph.node:
            ins = [i for i in node.input if i]
            if any(i in given for i in ins):
                given.update(o for o in node.output if o)
            if all(i in ok for i in ins):
                ok.update(o for o in node.output if o)
        inside |= given | ok
        return inside


def block_inputs(
    model: onnx.ModelProto | str | os.PathLike[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    base_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The extra tensors a block reads besides ``inputs`` (e.g. the attention mask, RoPE cos/sin, shapes computed
    outside the block): pass ``inputs=[*inputs, *block_inputs(...)]`` to :meth:`GraphProgram.from_model`."""
    proto, base = load_model(model, base_dir)
    index = ModelIndex(proto, base)
    index.check_names([*inputs, *outputs], "tensors")
    _, missing = index.walk(inputs, outputs, computable=index.block_region(inputs))
    return missing
