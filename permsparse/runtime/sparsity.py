"""What a TensorRT build says about sparsity: which prunable layers are 2:4, eligible, or got a sparse tactic.

Datacenter TensorRT logs ``(Sparsity) Layers eligible for sparse math:`` and ``... picked sparse implementation for
layers:``; layer-information lines name the tactic. TensorRT-RTX chooses kernels on the GPU at run time, so a CPU build
can only say which layers are sparse *candidates* (2:4 and both channel counts large enough).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from permsparse.ir.shapes import ShapeSpec
from permsparse.ir.weights import MIN_SPARSE_CHANNELS, WeightStatus

_ELIGIBLE_RE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)$")
_PICKED_RE = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(.*)$")
_ONNX_LAYER_RE = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
_TACTIC_RE = re.compile(r"TacticName: ([^,]*),")


@dataclass(frozen=True)
class LayerSparsity:
    """Sparsity outcome of one prunable ONNX MatMul/Gemm.

    ``status`` is one of: "sparse" (sparse tactic picked), "dense-faster" (eligible, TensorRT timed a dense tactic
    faster), "not-eligible" (TensorRT did not consider it), "candidate" (2:4 and large enough, but the build did not
    say: TensorRT-RTX selects kernels at run time), "dense" (not a candidate; see ``reason``).
    """

    node: str
    k: int
    n: int
    is_2to4: bool
    status: str
    reason: str
    label: str = ""  # the layer's name in the model (module path), as optimize and inspect show it

    @property
    def shown(self) -> str:
        return self.label or self.node


@dataclass(frozen=True)
class BuildReport:
    engine_path: Path
    module: str
    precision: str
    precision_mode: str
    sparse_flag: bool
    profiles: tuple[ShapeSpec, ...]
    build_seconds: float
    engine_bytes: int
    layers: tuple[LayerSparsity, ...]
    eligible: tuple[str, ...] | None
    picked: tuple[str, ...] | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_sparse(self) -> int:
        return sum(1 for layer in self.layers if layer.status == "sparse")

    @property
    def n_candidates(self) -> int:
        return sum(1 for layer in self.layers if layer.status in ("sparse", "dense-faster", "candidate"))

    def summary(self, max_rows: int = 200) -> str:
        lines = [
            f"engine: {self.engine_path} ({self.engine_bytes / 2**20:.1f} MiB, {self.module}, built in "
            f"{self.build_seconds:.1f} s)",
            f"precision: {self.precision} ({self.precision_mode}); sparse weights flag: "
            f"{'on' if self.sparse_flag else 'off'}",
            f"profiles: {' '.join(str(p) for p in self.profiles) or '(static shapes)'}",
        ]
        n24 = sum(1 for layer in self.layers if layer.is_2to4)
        if self.picked is not None:
            lines.append(
                f"sparsity: {self.n_sparse} of {len(self.layers)} prunable MatMul/Gemm layers use a sparse tactic "
                f"({n24} have 2:4 weights; TensorRT listed {len(self.eligible or ())} eligible)"
            )
        else:
            lines.append(
                f"sparsity: {n24} of {len(self.layers)} prunable MatMul/Gemm layers have 2:4 weights; "
                f"{self.n_candidates} are sparse candidates (the build log has no (Sparsity) lines)"
            )
        if self.layers:
            w = min(60, max(len(layer.shown) for layer in self.layers))
            lines.append(f"  {'layer':<{w}}  {'K x N':>11}  2:4  {'status':<13} why")
            for layer in self.layers[:max_rows]:
                kn = f"{layer.k}x{layer.n}"
                lines.append(
                    f"  {layer.shown[-w:]:<{w}}  {kn:>11}  {'yes' if layer.is_2to4 else 'no ':<3}  "
                    f"{layer.status:<13} {layer.reason}"
                )
            if len(self.layers) > max_rows:
                lines.append(f"  ... {len(self.layers) - max_rows} more")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _split_layers(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(", ") if item.strip())


def parse_sparsity_log(lines: list[str]) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """(eligible layers, picked layers) from TensorRT's ``(Sparsity)`` lines; None where the line is absent."""
    eligible = picked = None
    for line in lines:
        for msg in line.splitlines():
            if m := _ELIGIBLE_RE.search(msg):
                eligible = (eligible or ()) + _split_layers(m.group(1))
            elif m := _PICKED_RE.search(msg):
                picked = (picked or ()) + _split_layers(m.group(1))
    return eligible, picked


def _onnx_names(trt_layers: tuple[str, ...] | None) -> set[str]:
    names: set[str] = set()
    for layer in trt_layers or ():
        names.update(part.strip() for part in layer.split(" + "))
        names.add(layer)
    return names


def sparse_tactic_layers(layer_lines: list[str]) -> set[str]:
    """ONNX node names covered by an engine layer whose tactic name says it is sparse."""
    out: set[str] = set()
    for line in layer_lines:
        m = _TACTIC_RE.search(line)
        if m and "sparse" in m.group(1).lower():
            out.update(_ONNX_LAYER_RE.findall(line))
    return out


def classify_layers(
    weights: list[WeightStatus],
    eligible: tuple[str, ...] | None,
    picked: tuple[str, ...] | None,
    sparse_tactics: set[str],
    sparse_flag: bool,
    min_channels: int = MIN_SPARSE_CHANNELS,
) -> tuple[LayerSparsity, ...]:
    eligible_names, picked_names = _onnx_names(eligible), _onnx_names(picked)
    out = []
    for st in weights:
        w = st.weight
        obstacle = st.sparse_obstacle(min_channels)
        if not sparse_flag:
            status, reason = "dense", "built with --no-sparse"
        elif w.name in picked_names or w.name in sparse_tactics:
            status, reason = "sparse", "TensorRT picked a sparse tactic"
        elif picked is not None and w.name in eligible_names:
            status, reason = "dense-faster", "eligible, but a dense tactic timed faster" + (
                f" ({obstacle})" if obstacle else ""
            )
        elif picked is not None or eligible is not None:
            status = "not-eligible"
            reason = obstacle or "TensorRT did not list it (fused into another layer, or unsupported precision)"
        elif obstacle is None:
            status, reason = "candidate", "2:4 and large enough; kernel chosen at run time on the GPU"
        else:
            status, reason = "dense", obstacle
        out.append(LayerSparsity(w.name, w.k, w.n, st.nm_valid, status, reason, w.label))
    return tuple(out)
