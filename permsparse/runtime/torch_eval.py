"""Whole ONNX models on the project's torch evaluator with every 2:4 weight run by a 2:4 kernel.

:class:`SparseEvaluator` loads a model once: the graph is rewritten so that each ``MatMul(X, W)`` (and plain
``Gemm``) whose constant ``W[K, N]`` is 2:4 along K becomes one ``PermsparseLinear24`` node bound to a
:class:`Linear24` kernel that holds ``W`` compressed once (``to_sparse_semi_structured`` or cuSPARSELt through
``torch._cslt_compress``); every other weight stays a plain MatMul (cuBLAS on CUDA). On a 16-bit precision asked of an
fp32 model the graph is lowered: float constants and feeds become fp16/bf16 (clamped to the finite range, so masks
built as ``x * finfo.min`` stay finite), ``Cast(to=FLOAT)`` casts to the 16-bit type. 2:4 kernels exist only on CUDA
in fp16/bf16; elsewhere the same rewritten graph runs each kernel densely and says so.

:meth:`SparseEvaluator.bind` stages feeds on the device and returns the callable that is timed: on CUDA the program
is re-cut so that every host-side tensor a device op reads (masks and positions computed from shapes) is computed once
and fed as a device tensor, then captured in a CUDA graph; where capture fails, the eager program runs and the reason
is kept in :attr:`SparseEvaluator.notes`.

Invariant: every rewritten node computes ``X @ W (+ C)`` with the same ``W`` (each kernel is checked against the dense
product at load, relative error ≤ ``KERNEL_RTOL``, else that weight falls back to the dense product); the re-cut
program's extra inputs depend on shapes and constants only (integer graph inputs are staged on the device, so no
host tensor depends on input values), hence for the bound feeds it computes what the full program computes.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from permsparse.errors import PermsparseError
from permsparse.pattern import check_nm
from permsparse.torchgraph import GraphProgram, ProgramConfig
from permsparse.torchgraph.ops import OPS
from permsparse.torchgraph.registry import Node, OpFunction, register, to_torch
from permsparse.torchgraph.subgraph import ModelIndex, load_model

logger = logging.getLogger(__name__)

SPARSE_OP = "PermsparseLinear24"
#: A kernel whose relative error against the dense product exceeds this is not used (fp16/bf16 rounding is ~1e-3).
KERNEL_RTOL = 2e-2
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ONNX_FLOAT = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_LIVE: dict[str, Linear24] = {}
_ids = itertools.count()


@register(SPARSE_OP)
def _linear24(node: Node) -> OpFunction:
    key = node.attrs.get("kernel")
    kernel = _LIVE.get(str(key))
    if kernel is None:
        raise node.fail(f"no live 2:4 kernel {key!r} (the evaluator that made this node was closed)")
    return kernel


SELECT_OP = "PermsparseSelect"


@register(SELECT_OP)
def _select(node: Node) -> OpFunction:
    """``Gather(x, i)`` with a constant scalar ``i``: ``x.select(axis, i)`` (negative ``i`` counts from the end), with
    ``i`` a Python int, so no index tensor travels to the device on each call."""
    axis, index = int(node.attrs["axis"]), int(node.attrs["index"])

    def select(x: torch.Tensor) -> torch.Tensor:
        a = axis + x.dim() if axis < 0 else axis
        return x.select(a, index + x.shape[a] if index < 0 else index)

    return select


class Linear24:
    """``y = x @ W (+ bias)`` for one weight ``W[K, N]`` that is 2:4 along K, compressed once.

    ``method``: ``semi`` / ``cutlass`` / ``cusparselt`` (``to_sparse_semi_structured``, default or forced backend),
    ``cslt`` (``torch._cslt_compress`` + ``torch._cslt_sparse_mm``, algorithm 0), or ``dense`` (``x @ W``: the CPU
    path and the fallback). ``self.method`` says what actually runs; ``self.why`` why it is not the one asked.
    """

    def __init__(self, w_kn: torch.Tensor, method: str) -> None:
        self.k, self.n = w_kn.shape
        self.w_kn = w_kn
        self.dtype = w_kn.dtype
        self.asked = method
        self.method = "dense"
        self.why = ""
        self.rel_err = 0.0
        if method == "dense":
            return
        if w_kn.device.type != "cuda" or w_kn.dtype not in (torch.float16, torch.bfloat16):
            self.why = "2:4 kernels need CUDA and fp16/bf16"
            return
        try:
            self._fn = self._compress(method)
            x = torch.randn(64, self.k, device=w_kn.device, dtype=w_kn.dtype)
            ref = (x @ w_kn).float()
            got = self._fn(x).float()
            self.rel_err = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
            if not np.isfinite(self.rel_err) or self.rel_err > KERNEL_RTOL:
                raise RuntimeError(f"relative error {self.rel_err:.2e} > {KERNEL_RTOL}")
            self.method = method
            self.w_kn = None  # the compressed copy is all the kernel needs
        except Exception as exc:  # a kernel refusing a shape/GPU is a result, kept and reported
            self.why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
            self._fn = None

    def _compress(self, method: str) -> Callable[[torch.Tensor], torch.Tensor]:
        w_nk = self.w_kn.t().contiguous()
        if method in ("semi", "cutlass", "cusparselt"):
            from torch.sparse import (
                SparseSemiStructuredTensor,
                to_sparse_semi_structured,
            )

            old = SparseSemiStructuredTensor._FORCE_CUTLASS
            try:
                if method != "semi":
                    SparseSemiStructuredTensor._FORCE_CUTLASS = method == "cutlass"
                ws = to_sparse_semi_structured(w_nk)
            finally:
                SparseSemiStructuredTensor._FORCE_CUTLASS = old
            return lambda x: F.linear(x.contiguous(), ws)
        if method == "cslt":
            wc = torch._cslt_compress(w_nk)
            n = self.n

            def cslt(x: torch.Tensor) -> torch.Tensor:
                x2 = x.reshape(-1, x.shape[-1]).contiguous()
                y = torch._cslt_sparse_mm(wc, x2.t(), transpose_result=True)
                return y.reshape(*x.shape[:-1], n)

            return cslt
        raise PermsparseError(f"unknown 2:4 kernel '{method}'; choose semi, cutlass, cusparselt, cslt or dense")

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != self.dtype:  # a dtype mismatch would be a lowering bug: fail like MatMul would
            raise PermsparseError(f"2:4 kernel: input {x.dtype} but weight {self.dtype}")
        y = self._fn(x) if self.method != "dense" else torch.matmul(x, self.w_kn)
        return y if bias is None else y + bias


@dataclass(frozen=True)
class KernelReport:
    """What one weight runs: the node, its shape, the kernel asked and used, why not, the load check's error."""

    node: str
    k: int
    n: int
    asked: str
    used: str
    why: str
    rel_err: float


def _float_type(index: ModelIndex, nodes: list[onnx.NodeProto]) -> str:
    for node in nodes:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in index.initializers:
            t = index.initializers[node.input[1]].data_type
            return {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}.get(t, "fp32")
    return "fp32"


def _lowered_array(a: np.ndarray, precision: str) -> np.ndarray | torch.Tensor:
    """A float32/64 constant in the 16-bit type (fp16 clamped to its finite range); other arrays unchanged."""
    if a.dtype != np.float32 and a.dtype != np.float64:
        return a
    if precision == "fp16":
        lim = float(np.finfo(np.float16).max)
        return np.clip(a, -lim, lim).astype(np.float16)
    return torch.from_numpy(np.array(a, dtype=np.float32)).to(torch.bfloat16)  # a writable copy; fp32 range


def _on_host(t: torch.Tensor) -> bool:
    """Whether ``t`` lives on the host (a module function, so a CPU test can pretend floats live on a device)."""
    return t.device.type == "cpu"


class SparseEvaluator:
    """One ONNX model on :class:`~permsparse.torchgraph.GraphProgram` with 2:4 kernels (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, device: str = "cpu", precision: str | None = None,
                 method: str = "semi", cuda_graphs: bool = True) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise PermsparseError("--device cuda: torch.cuda.is_available() is False; use --device cpu")
        proto, base = load_model(path, None)
        index = ModelIndex(proto, base)
        stored = _float_type(index, list(proto.graph.node))
        self.precision = precision or (stored if stored != "fp32" or self.device.type == "cpu" else "fp16")
        if self.precision not in DTYPES:
            raise PermsparseError(f"precision '{self.precision}': choose fp32, fp16 or bf16")
        if stored != "fp32" and self.precision != stored:
            raise PermsparseError(f"{path}: weights are stored as {stored}; bench it with --precision {stored}")
        self.dtype = DTYPES[self.precision]
        self.lower = stored == "fp32" and self.precision != "fp32"
        self.method = method
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.notes: list[str] = []
        self.kernels: list[KernelReport] = []
        self._keys: list[str] = []
        self._index = index
        nodes = [self._rewrite(node, index) for node in proto.graph.node]
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        self._index = ModelIndex(proto, base)
        self.inputs = list(self._index.graph_inputs)
        self.outputs = list(self._index.graph_outputs)
        self.input_types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.input}
        self.program = self._program(self.inputs)
        self._summarize()

    # -- load ----------------------------------------------------------------------------------------------
    def _constant(self, name: str) -> np.ndarray | torch.Tensor | None:
        a = self._index.constant(name)
        return a if a is None or not self.lower else _lowered_array(a, self.precision)

    def _program(self, inputs: list[str], provider: Callable[[str], Any] | None = None) -> GraphProgram:
        nodes, missing = self._index.walk(inputs, self.outputs)
        if missing:
            raise PermsparseError(f"torch evaluator: outputs depend on {missing[:6]}, which are not inputs")
        return GraphProgram(nodes, provider or self._constant, opset=self._index.opset, inputs=inputs,
                            outputs=self.outputs, config=ProgramConfig(device=str(self.device)))

    def _rewrite(self, node: onnx.NodeProto, index: ModelIndex) -> onnx.NodeProto:
        if self.lower:
            node = self._lower(node)
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.input) == 2 and index.is_constant(
                node.input[1]):
            idx = index.constant(node.input[1])
            if idx is not None and idx.ndim == 0 and idx.dtype.kind in "iu":
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                return helper.make_node(SELECT_OP, [node.input[0]], list(node.output), name=node.name,
                                        axis=int(axis), index=int(idx))
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            return node
        w_name = node.input[1]
        if w_name not in index.initializers and w_name not in index.constant_nodes:
            return node
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias = None
        if node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return node
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        w = index.constant(w_name)
        if w is None or w.ndim != 2 or w.dtype.kind != "f":
            return node
        w_kn = w.T if node.op_type == "Gemm" and attrs.get("transB", 0) else w
        if w_kn.shape[0] % 4 or not check_nm(w_kn, 0, 2, 4):
            return node
        t = to_torch(np.ascontiguousarray(w_kn), upcast=False, device=self.device).to(self.dtype)
        kernel = Linear24(t, self.method if self.device.type == "cuda" else "dense")
        if self.device.type != "cuda" and not kernel.why:
            kernel.why = "2:4 kernels need CUDA (fp16/bf16); ran dense on CPU"
        key = f"k{next(_ids)}"
        _LIVE[key] = kernel
        self._keys.append(key)
        label = node.name or node.output[0]
        self.kernels.append(KernelReport(label, kernel.k, kernel.n, self.method, kernel.method, kernel.why,
                                         kernel.rel_err))
        ins = [node.input[0]] + ([bias] if bias else [])
        return helper.make_node(SPARSE_OP, ins, list(node.output), name=label, kernel=key)

    def _lower(self, node: onnx.NodeProto) -> onnx.NodeProto:
        target = _ONNX_FLOAT[self.precision]
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to in (TensorProto.FLOAT, TensorProto.DOUBLE):
                new = onnx.NodeProto()
                new.CopyFrom(node)
                for a in new.attribute:
                    if a.name == "to":
                        a.i = target
                return new
        if node.op_type == "ConstantOfShape":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE):
                    new = onnx.NodeProto()
                    new.CopyFrom(node)
                    v = numpy_helper.to_array(a.t).astype(np.float32)
                    t = (numpy_helper.from_array(np.asarray(_lowered_array(v, "fp16")), "value") if target == TensorProto.FLOAT16
                         else helper.make_tensor("value", target, list(v.shape), v.ravel().tolist()))
                    for b in new.attribute:
                        if b.name == "value":
                            b.t.CopyFrom(t)
                    return new
        return node

    def _summarize(self) -> None:
        by: dict[str, int] = {}
        for k in self.kernels:
            by[k.used] = by.get(k.used, 0) + 1
        total = len(self.kernels)
        if total == 0:
            self.notes.append("no 2:4 weight found: every MatMul runs dense")
            return
        ran = ", ".join(f"{c} {m}" for m, c in sorted(by.items()))
        self.notes.append(f"{total} 2:4 weights: {ran} ({'asked ' + self.method if self.device.type == 'cuda' else 'CPU'})")
        whys: dict[str, list[str]] = {}
        for k in self.kernels:
            if k.used != k.asked and k.why:
                whys.setdefault(k.why, []).append(f"{k.k}x{k.n}")
        for why, shapes in whys.items():
            uniq = sorted(set(shapes))
            self.notes.append(f"dense fallback for {len(shapes)} weights ({', '.join(uniq[:4])}): {why}")

    @property
    def max_kernel_error(self) -> float:
        return max((k.rel_err for k in self.kernels if k.used != "dense"), default=0.0)

    # -- run -----------------------------------------------------------------------------------------------
    def stage(self, feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Feeds as device tensors: floats in the evaluator's dtype, integers on the device too (see the module
        invariant: then no host-side tensor depends on input values)."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise PermsparseError(f"torch evaluator: no feed for inputs {missing}; give their shapes with --shapes")
        out = {}
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name]))
            t = t.to(self.dtype) if t.is_floating_point() else t
            out[name] = t.to(self.device)
        return out

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One eager run on host feeds; host outputs (floats as float32)."""
        with torch.inference_mode():
            outs = self.program.run(self.stage(feeds))
        return {k: (v.float() if v.is_floating_point() else v).cpu().numpy() for k, v in outs.items()}

    def bind(self, feeds: Mapping[str, np.ndarray], warmup: int = 3) -> Callable[[], object]:
        """The timed callable on staged feeds: eager on CPU; on CUDA the re-cut program in a CUDA graph."""
        staged = self.stage(feeds)
        if self.device.type != "cuda":
            return lambda: self._eager(self.program, staged)
        program, staged = self._recut(staged)
        eager = lambda: self._eager(program, staged)
        for _ in range(max(1, warmup)):
            eager()
        torch.cuda.synchronize()
        if not self.cuda_graphs:
            self.notes.append("CUDA graph: off (asked)")
            return eager
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    eager()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                self._graph_out = program.run(staged)
            graph.replay()
            torch.cuda.synchronize()
            ref = self._eager(program, staged)
            for k, v in ref.items():
                got = self._graph_out[k]
                if v.is_floating_point():
                    bad = float((got.float() - v.float()).abs().max()) > 1e-3 * float(v.float().abs().max()) + 1e-6
                else:
                    bad = not torch.equal(got, v)
                if bad:
                    raise RuntimeError(f"replayed output {k!r} differs from the eager run")
            self.notes.append("CUDA graph: captured (replay matches the eager run)")
            self._graph = graph
            return graph.replay
        except Exception as exc:
            self.notes.append(f"CUDA graph: not applicable ({type(exc).__name__}: "
                              f"{(str(exc).strip().splitlines() or [''])[0][:140]}); timed eagerly")
            torch.cuda.synchronize()
            return eager

    @staticmethod
    def _eager(program: GraphProgram, staged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return program.run(staged)

    def _recut(self, staged: dict[str, torch.Tensor]) -> tuple[GraphProgram, dict[str, torch.Tensor]]:
        """Feed host tensors read by device ops as device inputs (computed once; they depend on shapes only)."""
        host: dict[str, torch.Tensor] = {}
        on_device: set[str] = set(staged)

        def hook(name: str, value: Any) -> None:
            if isinstance(value, torch.Tensor):
                if _on_host(value):
                    host[name] = value
                else:
                    on_device.add(name)

        with torch.inference_mode():
            self.program.run(staged, hook=hook)
        readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        nodes, _ = self._index.walk(self.inputs, self.outputs)
        for node in nodes:
            for pos, x in enumerate(node.input):
                readers.setdefault(x, []).append((node, pos))

        def device_data_read(node: onnx.NodeProto, pos: int) -> bool:
            spec = OPS.get(node.op_type)
            shape_pos = spec.shape_inputs if spec else frozenset()
            return pos not in shape_pos and any(o in on_device for o in node.output if o)

        frontier = [x for x in host if readers.get(x) and all(device_data_read(n, p) for n, p in readers[x])]
        # Integer/bool constants read as data by device ops (e.g. a permutation Gather's indices): staged once too.
        for x, users in readers.items():
            if x in host or x in staged or not self._index.is_constant(x):
                continue
            value = self.program.constant(x) if x in self.program.weight_names else None
            if value is not None and not value.is_floating_point() and _on_host(value) and all(
                    device_data_read(n, p) for n, p in users):
                host[x] = value
                frontier.append(x)
        if not frontier:
            return self.program, staged
        base = self.program
        program = self._program(self.inputs + frontier, provider=lambda n: base.constant(n))
        fed = dict(staged)
        fed.update({x: host[x].to(self.device) for x in frontier})
        self.frontier = frontier
        logger.info("torch evaluator: %d host tensors computed once and fed to the device", len(frontier))
        return program, fed

    def close(self) -> None:
        for key in self._keys:
            _LIVE.pop(key, None)
        self._keys.clear()
        self.program = None  # type: ignore[assignment]
        self._graph = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def compiled_runner(evaluator: SparseEvaluator, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
    """``torch.compile`` of the evaluator's program on staged feeds (the dense baseline's best eager path)."""
    staged = evaluator.stage(feeds)
    program = evaluator.program

    def forward(**kw: torch.Tensor) -> dict[str, torch.Tensor]:
        return program.run(kw)

    fn = torch.compile(forward, dynamic=False)  # default mode: no autotuning (minutes), no CUDA graphs
    quiet = logging.getLogger("torch._dynamo")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # graph breaks at shape arithmetic are expected; they are not errors
    try:
        with torch.inference_mode():
            fn(**staged)
    finally:
        quiet.setLevel(level)
    return lambda: fn(**staged)
