"""A differentiable torch evaluator of ONNX graphs and blocks of them.

:class:`GraphProgram` resolves every node once (op function and attributes, see :mod:`permsparse.torchgraph.ops`)
into a flat list of steps; :meth:`GraphProgram.run` then only looks tensors up, calls the step and frees tensors
after their last use. Constants (initializers, Constant nodes) are converted to torch on first use and cached;
``overrides`` substitute (possibly trainable) tensors for them without touching the cache, so gradients flow to the
overrides.

Invariant: steps run in a topological order of the nodes, each reading only given inputs, constants (or their
overrides) and outputs of earlier steps; each step is the ONNX semantics of its node (the op modules' invariants).
Hence the outputs equal the ONNX graph's outputs up to floating-point rounding, computed in each tensor's own dtype
(float32 for 16-bit floats under ``upcast``). Float data lives on ``device``; integer shape tensors on the CPU.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch

from permsparse.errors import PermsparseError
from permsparse.torchgraph.ops import resolve
from permsparse.torchgraph.registry import OpFunction, constant_node_value, to_torch
from permsparse.torchgraph.subgraph import ModelIndex, load_model

log = logging.getLogger(__name__)

Feed = torch.Tensor | np.ndarray
ConstantSource = Mapping[str, np.ndarray] | Callable[[str], "np.ndarray | None"]


@dataclass(frozen=True)
class ProgramConfig:
    """How a :class:`GraphProgram` computes (``None`` means the default)."""

    upcast: bool | None = None  # compute float16/bfloat16 tensors and constants in float32 (default False)
    device: str | None = None  # torch device for float tensors (default "cpu")


@dataclass(frozen=True)
class _Step:
    fn: OpFunction
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...]
    op_type: str
    name: str


def _on_device(fn: OpFunction, shape_inputs: frozenset[int]) -> OpFunction:
    """Wrap ``fn`` so CPU data inputs meet a device input on its device (shape-like inputs stay on the CPU)."""

    def call(*args: Any) -> Any:
        device = next(
            (a.device for i, a in enumerate(args) if i not in shape_inputs and a is not None and a.device.type != "cpu"),
            None,
        )
        if device is not None:
            args = tuple(
                a.to(device) if i not in shape_inputs and a is not None and a.device != device else a
                for i, a in enumerate(args)
            )
        return fn(*args)

    return call


def _topological(nodes: Sequence[onnx.NodeProto], given: set[str]) -> list[int]:
    """Node indices in a topological order, stable (the given order when it already is one)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o and o not in given}
    deps = [{producer[x] for x in n.input if x in producer and producer[x] != i} for i, n in enumerate(nodes)]
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    count = [len(d) for d in deps]
    ready = [i for i, c in enumerate(count) if c == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            count[u] -= 1
            if count[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        done = set(order)
        stuck = [nodes[i].name or nodes[i].op_type for i in range(len(nodes)) if i not in done]
        raise PermsparseError(f"torchgraph: the nodes form a cycle (e.g. {stuck[:5]}); ONNX graphs must be acyclic.")
    return order


class GraphProgram:
    """Differentiable torch evaluation of a list of ONNX nodes (a whole graph or a block of it)."""

    def __init__(
        self,
        nodes: Sequence[onnx.NodeProto],
        constants: ConstantSource,
        *,
        opset: int,
        inputs: Sequence[str],
        outputs: Sequence[str],
        config: ProgramConfig | None = None,
    ) -> None:
        cfg = config or ProgramConfig()
        self.config = cfg
        self.upcast = bool(cfg.upcast)
        self.device = torch.device(cfg.device or "cpu")
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.opset = opset
        given = set(self.inputs)
        self._node_constants: dict[str, np.ndarray] = {}
        plain: list[onnx.NodeProto] = []
        for node in nodes:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self._node_constants.update({o: constant_node_value(node) for o in node.output if o not in given})
            else:
                plain.append(node)
        self._provider: Callable[[str], np.ndarray | None] = (
            constants.get if isinstance(constants, Mapping) else constants
        )
        known = (lambda n: n in constants) if isinstance(constants, Mapping) else (lambda n: True)

        steps: list[tuple[onnx.NodeProto, OpFunction, frozenset[int]]] = []
        available = set(given)
        weights: dict[str, None] = {}
        data_constants: set[str] = set()  # constants read as data somewhere (the others stay on the CPU)
        shape_reads: set[str] = set()  # constants read as shape-like inputs somewhere
        missing: dict[str, str] = {}
        for i in _topological(plain, given):
            node = plain[i]
            fn, spec, parsed = resolve(node, opset=opset, upcast=self.upcast, device=self.device)
            for pos, x in enumerate(node.input):
                if not x or x in available:
                    continue
                if x in self._node_constants or known(x):
                    weights.setdefault(x)
                    (shape_reads if pos in spec.shape_inputs else data_constants).add(x)
                else:
                    missing.setdefault(x, parsed.name)
            available.update(o for o in node.output if o)
            steps.append((node, fn, spec.shape_inputs))
        for out in self.outputs:
            if out not in available:
                if out in self._node_constants or known(out):
                    weights.setdefault(out)
                    data_constants.add(out)
                else:
                    missing.setdefault(out, "(an output)")
        if missing:
            listed = ", ".join(f"{k!r} (read by {v})" for k, v in list(missing.items())[:8])
            raise PermsparseError(
                f"torchgraph: {len(missing)} tensors are neither inputs, constants nor computed by the nodes: "
                f"{listed}. Pass them as inputs (and feed them), or include the nodes that compute them."
            )
        self._weight_names = list(weights)
        cpu = torch.device("cpu")
        self._constant_device = {n: cpu if n not in data_constants else self.device for n in weights}
        # On an accelerator, a constant read both as data and as a shape gets a CPU twin for its shape reads, so
        # shape arithmetic never waits for the device.
        twins = shape_reads & data_constants if self.device.type != "cpu" else set()
        self._cpu_twin = {n: f"{n}::cpu" for n in twins}
        self._steps = self._schedule(steps, given)
        self._cache: dict[str, torch.Tensor] = {}
        self._produced = {o for s in self._steps for o in s.outputs if o}
        log.debug("torchgraph program: %d steps, %d constants", len(self._steps), len(self._weight_names))

    def _schedule(
        self, steps: list[tuple[onnx.NodeProto, OpFunction, frozenset[int]]], given: set[str]
    ) -> list[_Step]:
        last_use: dict[str, int] = {}
        for i, (node, _, _) in enumerate(steps):
            for x in node.input:
                last_use[x] = i
        keep = set(self.outputs) | given
        release: list[list[str]] = [[] for _ in steps]
        for i, (node, _, _) in enumerate(steps):
            for o in node.output:
                if o and o not in keep:
                    release[max(last_use.get(o, i), i)].append(o)
        on_cpu = self.device.type == "cpu"
        return [
            _Step(
                fn if on_cpu else _on_device(fn, shape),
                tuple(
                    self._cpu_twin.get(x, x) if pos in shape else x for pos, x in enumerate(node.input)
                ),
                tuple(node.output),
                tuple(release[i]),
                node.op_type,
                node.name or (node.output[0] if node.output else "?"),
            )
            for i, (node, fn, shape) in enumerate(steps)
        ]

    @classmethod
    def from_model(
        cls,
        model: onnx.ModelProto | str | os.PathLike[str],
        *,
        inputs: Sequence[str] | None = None,
        outputs: Sequence[str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        config: ProgramConfig | None = None,
    ) -> GraphProgram:
        """The nodes needed to compute ``outputs`` (default: graph outputs) from ``inputs`` (default: graph inputs;
        any tensor names may be given, e.g. a block's input residual tensor plus side inputs such as an attention
        mask, see :func:`~permsparse.torchgraph.subgraph.block_inputs`), found by walking back from the outputs.
        Raises :class:`PermsparseError` naming the missing tensors if the outputs depend on something that is
        neither given nor a constant. Constants: initializers and Constant nodes (external data read lazily from
        ``base_dir`` / the model's folder)."""
        proto, base = load_model(model, base_dir)
        index = ModelIndex(proto, base)
        ins = list(index.graph_inputs if inputs is None else inputs)
        outs = list(index.graph_outputs if outputs is None else outputs)
        index.check_names(ins, "inputs")
        index.check_names(outs, "outputs")
        nodes, missing = index.walk(ins, outs)
        if missing:
            _, side = index.walk(ins, outs, computable=index.block_region(ins))
            raise PermsparseError(
                f"torchgraph: the outputs {outs[:4]} depend on {missing[:8]}, which are neither given inputs nor "
                f"constants. Add them to inputs=, or, to run a block only, add the tensors the block reads from "
                f"outside: {side[:8]} (what torchgraph.block_inputs returns)."
            )
        return cls(nodes, index.constant, opset=index.opset, inputs=ins, outputs=outs, config=config)

    @property
    def weight_names(self) -> list[str]:
        """Every constant the nodes read (initializers and Constant outputs), in first-use order."""
        return list(self._weight_names)

    @property
    def op_types(self) -> list[str]:
        """The op type of every step, in execution order."""
        return [s.op_type for s in self._steps]

    @property
    def matmul_weights(self) -> dict[str, str]:
        """``{weight name: activation tensor}`` for each MatMul/Gemm whose B input is a constant (for ``hook``)."""
        consts = set(self._weight_names)
        return {
            s.inputs[1]: s.inputs[0]
            for s in self._steps
            if s.op_type in ("MatMul", "Gemm") and len(s.inputs) > 1 and s.inputs[1] in consts
        }

    def constant(self, name: str) -> torch.Tensor:
        """The cached torch value of constant ``name`` (converted on first use; float on ``device`` unless only read
        as a shape-like input)."""
        value = self._cache.get(name)
        if value is None:
            device = self._constant_device.get(name, self.device)
            value = self._cache[name] = to_torch(self._array(name), upcast=self.upcast, device=device)
        return value

    def _array(self, name: str) -> np.ndarray:
        array = self._node_constants.get(name)
        if array is None:
            array = self._provider(name)
        if array is None:
            raise PermsparseError(f"torchgraph: constant {name!r} was not found in the constants given.")
        return array

    def _twin(self, name: str, override: Feed | None) -> torch.Tensor:
        if override is not None:
            return to_torch(override.detach() if isinstance(override, torch.Tensor) else override,
                            upcast=self.upcast, device=torch.device("cpu")).cpu()
        twin = self._cpu_twin[name]
        if twin not in self._cache:
            self._cache[twin] = to_torch(self._array(name), upcast=self.upcast, device=torch.device("cpu"))
        return self._cache[twin]

    def clear_cache(self) -> None:
        """Forget the converted constants (they are converted again on the next run)."""
        self._cache.clear()

    def run(
        self,
        feeds: Mapping[str, Feed],
        *,
        overrides: Mapping[str, Feed] | None = None,
        keep: Collection[str] = (),
        hook: Callable[[str, torch.Tensor], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Outputs (plus the intermediate tensors named in ``keep``). ``overrides`` replaces constants by (possibly
        requires_grad) torch tensors, so gradients flow to them. ``hook(name, value)`` is called for every produced
        tensor (e.g. to accumulate Hessians of MatMul inputs without keeping all activations)."""
        env: dict[str, Any] = {"": None}
        for name in self._weight_names:
            env[name] = self.constant(name)
        if overrides:
            unknown = [k for k in overrides if k not in env]
            if unknown:
                raise PermsparseError(
                    f"torchgraph: overrides {unknown[:5]} are not constants read by this program; "
                    "see GraphProgram.weight_names."
                )
            for k, v in overrides.items():
                env[k] = to_torch(v, upcast=self.upcast, device=self._constant_device.get(k, self.device))
        for name, twin in self._cpu_twin.items():
            env[twin] = self._twin(name, overrides.get(name) if overrides else None)
        absent = [n for n in self.inputs if n not in feeds]
        extra = [n for n in feeds if n not in self.inputs]
        if absent or extra:
            raise PermsparseError(
                f"torchgraph: feeds must be exactly the program inputs {self.inputs}; "
                f"missing {absent}, unexpected {extra}."
            )
        for name in self.inputs:
            env[name] = to_torch(feeds[name], upcast=self.upcast, device=self.device)
        keep_set = set(keep)
        stray = keep_set - self._produced - set(self.inputs)
        if stray:
            raise PermsparseError(f"torchgraph: keep= names {sorted(stray)[:5]} are not computed by this program.")
        kept: dict[str, torch.Tensor] = {k: env[k] for k in keep_set if k in env and k in self.inputs}
        for step in self._steps:
            args = [env[x] for x in step.inputs]
            try:
                result = step.fn(*args)
            except PermsparseError:
                raise
            except Exception as exc:
                raise self._failure(step, args, exc) from exc
            if len(step.outputs) == 1:
                env[step.outputs[0]] = result
            else:
                for o, v in zip(step.outputs, result):
                    if o:
                        env[o] = v
            if hook is not None or keep_set:
                for o in step.outputs:
                    if o and env.get(o) is not None:
                        if hook is not None:
                            hook(o, env[o])
                        if o in keep_set:
                            kept[o] = env[o]
            for x in step.release:
                del env[x]
        out = {o: env[o] for o in self.outputs}
        out.update(kept)
        return out

    __call__ = run

    def _failure(self, step: _Step, args: list[Any], exc: Exception) -> PermsparseError:
        shapes = ", ".join(
            f"{n or '-'}: {tuple(a.shape)} {str(a.dtype).replace('torch.', '')}" if isinstance(a, torch.Tensor)
            else f"{n or '-'}: {a!r}"
            for n, a in zip(step.inputs, args)
        )
        return PermsparseError(
            f"torchgraph: node {step.name!r} ({step.op_type}) failed: {type(exc).__name__}: {exc} [inputs {shapes}]"
        )

    def __len__(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        return (
            f"GraphProgram({len(self._steps)} steps, {len(self._weight_names)} constants, inputs={self.inputs[:4]}, "
            f"outputs={self.outputs[:4]}, upcast={self.upcast}, device={self.device})"
        )
