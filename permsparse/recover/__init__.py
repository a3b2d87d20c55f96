"""Recovery: whole-model sparse distillation of a 2:4 model from its dense teacher, masks frozen.

    permsparse recover model.sparse.onnx --teacher model.onnx -o model.recovered.onnx --recover-minutes 5

    import permsparse
    from permsparse import RecoverConfig
    permsparse.recover("model.sparse.onnx", "model.onnx", "model.recovered.onnx", RecoverConfig(steps=200))

The student (the sparse ONNX) runs in PyTorch through the project's graph evaluator (:mod:`permsparse.torchgraph`)
as a whole model, block by block (with activation checkpointing when the student trains over 20 M values:
``RecoverConfig.checkpoint``; :mod:`.model`), on ``device`` (:mod:`permsparse.devices`); the kept weights of the pruned
MatMuls (masked), biases and norm parameters — or only the biases and norms (``params="norms"``, PERP) — are trained
with AdamW against the teacher (:mod:`.train`); the best held-out weights are written back into the same graph in
the model's own dtype (:mod:`.write`).

Memory: the models are loaded one at a time — the teacher's analysis, then the teacher's constants (the proto is
dropped once they are converted), then the student's — and freed memory is handed back to the system between the
phases; a masked weight is held as its kept entries only (values, gradient and AdamW moments). A SmolLM2-135M
recovery peaks at 3.4 GB RSS (``bench/results/recovery-smollm2.md``).

Invariant: the output has the student's graph (same nodes, initializer names, shapes and types), every pruned weight
is N:M with the student's mask, and its held-out score is no worse than the student's (otherwise the student's
values are written).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from permsparse.recover.config import RecoverConfig

log = logging.getLogger(__name__)


@dataclass
class RecoverResult:
    """What one recovery did (``to_dict`` for ``--json`` and the recipe)."""

    output: Path
    params: str
    device: str
    steps: int
    tokens: int
    seconds: float
    metric: str  # "ppl" (decoders, early-stopping slice) or "pooled_cosine" (encoders, to the teacher)
    heldout_before: float
    heldout_best: float
    best_step: int
    improved: bool
    trained_tensors: int
    trained_values: int
    masked_weights: int
    data_source: str
    data_sha256: str
    lr: float
    resumed_from: int = 0
    peak_rss_mb: float = 0.0
    curve: list[dict] = field(default_factory=list)
    precision: str = "fp32"  # "bf16": the student's matrix products ran under bf16 autocast

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        return d


def _pattern(model) -> tuple[int, int]:
    for p in model.metadata_props:
        if p.key == "permsparse.pattern" and ":" in p.value:
            n, m = p.value.split(":")
            return int(n), int(m)
    return 2, 4


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _trim() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc keeps it otherwise: a freed proto or a
    finished analysis would still count in the process's resident memory)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back explicitly
        pass


def recover(sparse: str | os.PathLike[str], dense: str | os.PathLike[str], output: str | os.PathLike[str],
            config: RecoverConfig | None = None) -> RecoverResult:
    """Distil ``sparse`` (the student) from ``dense`` (its teacher) and write ``output`` (see the module doc)."""
    import numpy as np

    from permsparse.devices import autocast_dtype
    from permsparse.errors import PermsparseError
    from permsparse.ir.model import model_files
    from permsparse.ir.save import check_output, work_dir
    from permsparse.pipeline.blockwise.state import half_weights
    from permsparse.recover.config import CHECKPOINT_ABOVE_VALUES, INDEX_MAX_VALUES
    from permsparse.recover.data import recovery_data
    from permsparse.recover.model import (
        analyze_teacher,
        build_pieces,
        find_trainable,
        load_proto,
    )
    from permsparse.recover.train import (
        Recovery,
        StudentWeights,
        fingerprint,
        resolve_device,
        run_pieces,
    )
    from permsparse.recover.write import write_model

    cfg = (config or RecoverConfig()).resolved()
    src, teacher_path, dst = Path(sparse), Path(dense), Path(output)
    from permsparse.data.kinds import ids_spec, model_inputs

    # checks first, one model at a time (a model with embedded weights is read whole)
    student = load_proto(src)
    files = model_files(src, student)
    s_io = ([i.name for i in student.graph.input], [o.name for o in student.graph.output])
    n, m = _pattern(student)
    spec = ids_spec(model_inputs(student))
    ids_name = spec.name if spec is not None else None
    del student
    teacher = load_proto(teacher_path)
    files |= model_files(teacher_path, teacher)
    t_io = ([i.name for i in teacher.graph.input], [o.name for o in teacher.graph.output])
    del teacher
    _trim()
    check_output(dst, frozenset(files))
    if s_io != t_io:
        raise PermsparseError(
            f"the teacher {teacher_path} and the student {src} are not the same model (different graph inputs or "
            "outputs); give the dense model the student was made from"
        )
    device = resolve_device(cfg.device)
    data = recovery_data(src, cfg, teacher_path)  # refuses empty --calib before any heavy work
    if cfg.lr is None:
        from permsparse.recover.config import default_lr

        cfg = replace(cfg, lr=default_lr(data.kind, cfg.params))
    plan, bp = analyze_teacher(teacher_path)
    _trim()
    # the teacher: constants converted, then its proto dropped
    teacher = load_proto(teacher_path)
    t_pieces = build_pieces(teacher, teacher_path.parent, bp, upcast=half_weights(teacher), device=device)
    t_pieces.cache_and_release()
    del teacher
    _trim()
    # the student: masked weights as their kept entries (trained in place, sharing memory on the CPU)
    student = load_proto(src)
    trainable = find_trainable(student, src.parent, plan, n, m, cfg.params)
    n_kept = int(sum(int(np.asarray(v[1]).sum()) for v in trainable.masked.values()))
    weights = StudentWeights.from_trainable(trainable, device, index=n_kept <= INDEX_MAX_VALUES)
    if not len(weights):
        raise PermsparseError("nothing to train: no masked weight, bias or norm parameter found in the student")
    s_pieces = build_pieces(student, src.parent, bp, upcast=half_weights(student), device=device,
                            tensors={k: v for k, v in weights.values.items() if k not in weights.masks},
                            shapes=weights.shapes)
    s_pieces.cache_and_release()
    del student, plan
    _trim()
    _check_same_model(s_pieces, t_pieces, weights, data.stop[0], device, run_pieces)
    # "auto" settles here, so the recipe and the resume fingerprint name what ran
    cfg = replace(cfg, precision="bf16" if autocast_dtype(cfg.precision, device) is not None else "fp32")
    fp = fingerprint(src.stat().st_size, src.stat().st_mtime_ns, teacher_path.stat().st_size, data.sha256,
                     {k: v for k, v in vars(cfg).items() if k not in ("progress", "work_dir", "device", "checkpoint")},
                     "kept-entries")  # checkpoints hold masked weights as their kept entries
    n_masked = len(trainable.masked)
    n_values = n_kept + int(sum(v.size for v in trainable.free.values()))
    if cfg.checkpoint is None:  # recomputation only where the activations would weigh
        cfg = replace(cfg, checkpoint=n_values > CHECKPOINT_ABOVE_VALUES)
    t0 = time.perf_counter()
    with work_dir(dst.parent, "recover") as tmp:
        work = Path(cfg.work_dir) if cfg.work_dir else tmp
        work.mkdir(parents=True, exist_ok=True)
        rec = Recovery(s_pieces, t_pieces, trainable, weights, data, cfg, device, work, fp, ids_name)
        result = rec.run()
        del rec, s_pieces, t_pieces, weights  # optimizer state and both models' constants
        _trim()
        improved = result.best_step > 0
        values = result.values if improved else {}  # not improved: the student's own values are written
        meta = {"teacher": teacher_path.name, "params": cfg.params, "steps": result.steps, "tokens": result.tokens,
                "best_step": result.best_step, "data_sha256": data.sha256, "data": data.source}
        write_model(src, dst, values, trainable, n, m, meta)
    metric = "ppl" if data.kind == "lm" else "pooled_cosine"
    res = RecoverResult(
        dst, cfg.params, str(device), result.steps, result.tokens, time.perf_counter() - t0, metric,
        result.heldout_before, result.heldout_best if improved else result.heldout_before, result.best_step,
        improved, len(trainable.masked) + len(trainable.free), n_values,
        n_masked, data.source, data.sha256, cfg.lr, result.resumed_from, _peak_rss_mb(),
        [p.__dict__ for p in result.curve], cfg.precision)
    log.info("recovery: held-out %s %.4g -> %.4g in %d steps (%d tokens, %.0f s)", metric, res.heldout_before,
             res.heldout_best, res.steps, res.tokens, res.seconds)
    return res


def _check_same_model(student, teacher, weights, feed, device, run_pieces) -> None:
    """The residual stream entering block 0 must agree (it holds no pruned weight): else not the same model."""
    import torch

    from permsparse.devices import feed_to_device
    from permsparse.errors import PermsparseError

    if not student.blocks:
        return  # one piece only: nothing block-free to compare (the inputs and outputs were compared)
    with torch.no_grad():
        tfeed = feed_to_device(feed, device)
        name = student.prefix.outputs[0]
        a = student.prefix.program.run({k: tfeed[k] for k in student.prefix.inputs},
                                        overrides=weights.materialize(student.prefix.params) or None)[name].float()
        b = teacher.prefix.program.run({k: tfeed[k] for k in teacher.prefix.inputs})[name].float()
    if a.shape != b.shape:
        raise PermsparseError("the teacher and the student are not the same model (different hidden sizes); give "
                              "the dense model the student was made from")
    rel = float((a - b).norm() / b.norm().clamp(min=1e-12))
    if not rel <= 0.1:
        raise PermsparseError(
            f"the teacher and the student are not the same model (their embeddings differ by {rel:.2g} relative); "
            "give the dense model the student was made from"
        )


class _CallableModule(types.ModuleType):
    """``permsparse.recover`` is both this package and the API function: importing the package binds the name to
    the module, so the module itself calls :func:`recover`."""

    def __call__(self, sparse, dense, output, config: RecoverConfig | None = None) -> RecoverResult:
        return recover(sparse, dense, output, config)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["RecoverConfig", "RecoverResult", "recover"]
