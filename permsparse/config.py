"""Configuration of ``optimize``: one frozen dataclass; ``None`` means the default.

:meth:`OptimizeConfig.resolved` fills the defaults and validates every option (a :class:`UsageError` says which
option is wrong and what is allowed), so the CLI and the Python API refuse the same things before any work starts.
The registries of allowed values live with the code that implements them (:data:`~permsparse.optimizer.methods.
METHOD_FACTORIES`, :data:`~permsparse.optimizer.importance.IMPORTANCE_REGISTRY`, :data:`~permsparse.models.registry.
MODEL_FAMILIES`); the name tuples here are read from them, for the CLI and for validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from permsparse.errors import UsageError
from permsparse.ir.compare import DEFAULT_RTOL
from permsparse.models.zoo import EXPORTERS as _EXPORTERS
from permsparse.models.zoo import MODEL_FAMILIES, model_sizes
from permsparse.optimizer.hessian import DEFAULT_DAMP
from permsparse.optimizer.importance import IMPORTANCE_REGISTRY
from permsparse.optimizer.methods import METHOD_FACTORIES
from permsparse.pattern import NMPattern
from permsparse.runtime.backends import DEVICES, backend_names  # noqa: F401  (DEVICES re-exported for the CLI)

if TYPE_CHECKING:
    from permsparse.ir.shapes import ShapeSpec

#: Names the CLI offers. Methods, importances, model families and exporters are read from the registries of the
#: modules that implement them (each a module-level dict filled by a ``register`` decorator; nothing heavy loads).
METHODS: tuple[str, ...] = tuple(METHOD_FACTORIES)
IMPORTANCES: tuple[str, ...] = tuple(name for name, imp in IMPORTANCE_REGISTRY.items() if imp.offered)
POLICIES: tuple[str, ...] = ("fold", "global", "local")
OBJECTIVES: tuple[str, ...] = ("importance", "output", "block")
RECONSTRUCTIONS: tuple[str, ...] = ("sparsegpt", "none")
TEACHERS: tuple[str, ...] = ("dense", "local")
CHECKS: tuple[str, ...] = ("auto", "whole", "blocks")
#: build / bench / export.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
PRECISION_MODES: tuple[str, ...] = ("auto", "flags", "onnx")
BACKENDS: tuple[str, ...] = backend_names()  # the registry in permsparse/runtime/backends/
SPARSE_METHODS: tuple[str, ...] = ("semi", "cutlass", "cusparselt", "cslt")
EXPORTERS: tuple[str, ...] = _EXPORTERS
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_FAMILIES)
MODEL_SIZES: tuple[str, ...] = model_sizes()
#: Importances that need calibration data (per-channel activation norms or Hessians).
CALIBRATED_IMPORTANCES = frozenset(name for name in IMPORTANCES if IMPORTANCE_REGISTRY[name].needs != "weights")


@dataclass(frozen=True)
class OptimizeConfig:
    """Settings of ``permsparse optimize`` (``None`` means the default; see :meth:`resolved`).

    Attributes:
        method: permutation method (:data:`METHODS`); default ``lsa``.
        policy: how permutations are realized (:data:`POLICIES`); default ``local``.
        pattern: N:M pattern; default 2:4.
        importance: mask importance (:data:`IMPORTANCES`); default ``wanda`` (calibrated on the
            built-in text for text models).
        objective: what permutations optimize (:data:`OBJECTIVES`): ``importance`` kept, ``output`` (each unit's
            output error on calibration data, with the mask rule really applied), ``block`` (PermLLM: all
            permutations of a Transformer block jointly, 1 − cos of the block output); default ``importance``.
        reconstruct: ``sparsegpt`` (OBS mask choice and update of the kept weights from the calibration Hessian,
            in the permuted order, block by block) or ``none`` (plain masking); default ``sparsegpt`` (models without
            Transformer blocks fall back to ``none`` with a warning).
        sequential: block by block, each block calibrated on the outputs of the already pruned blocks before it;
            default True whenever calibration runs block-wise (reconstruction, output/block objectives, tuning).
        finetune_epochs: epochs of tuning the kept weights of each block with the masks frozen; default 0 (4 for
            text encoders, with 128 calibration texts, when no calibration option is given).
        finetune_lr: Adam learning rate of that tuning; default 1e-4.
        block_steps: optimizer steps of the joint block learner (``objective="block"``) per block; default 30.
        teacher: target of block-wise steps: ``dense`` (the dense model's own block outputs, so later blocks
            compensate earlier errors) or ``local`` (the dense block applied to the pruned stream); default dense.
        damp: SparseGPT dampening, a share of mean(diag H); default
            :data:`permsparse.optimizer.hessian.DEFAULT_DAMP` (0.1).
        mask: apply the masks (``False`` writes the permuted dense model); default True.
        prune_head: also prune weights that write a graph output; default False.
        exclude: regular expressions of weights kept dense.
        shapes: input shapes for analysis and checks (the ``opt`` shape is used).
        calib: calibration source (file/folder); default: built-in real text for text models.
        calib_samples / calib_seq_len: calibration examples and tokens per example; default 128 / 128 (16 k
            tokens of the built-in text mix: bench/results/calibration-smollm2.md).
        tokenizer: tokenizer folder for text calibration; default: beside the model, else the built-in one.
        seed: seed of every random choice; default 0.
        rtol: tolerance of the fold check; default 1e-4.
        budget_s: seconds for learning (> 0); default: none.
        workers: solver processes; default: all cores.
        learned: :class:`permsparse.optimizer.learned.LearnedConfig` knobs.
        recipe_perms: permutations to replay (unit name -> perm) instead of learning them (``--recipe``).
        check: how the model is run for the fold check and the Wanda/RIA calibration: ``whole`` (the whole model on
            onnxruntime), ``blocks`` (block by block in PyTorch, for models too big to hold twice), ``auto`` (whole
            unless the model is over ~4 GB in fp32); default auto.
        cluster: where units are solved: ``local`` (a reusable pool of this machine's processes), ``auto`` (Ray: the
            running cluster, else a local Ray instance) or ``ray://HOST:PORT`` (Ray client); default local.
        work_dir: keep every solved unit there (keyed by its weights, method, options and seed) and reuse it when the
            run is started again, e.g. after it was killed; default None (nothing kept).
        evaluate: after writing, measure plain N:M and the result against the dense input on held-out data
            (``--report``); default False.
        progress: progress bars; default True.
    """

    method: str | None = None
    policy: str | None = None
    pattern: NMPattern | str | None = None
    importance: str | None = None
    objective: str | None = None
    reconstruct: str | None = None
    sequential: bool | None = None
    finetune_epochs: int | None = None
    finetune_lr: float | None = None
    block_steps: int | None = None
    teacher: str | None = None
    damp: float | None = None
    mask: bool | None = None
    prune_head: bool | None = None
    exclude: tuple[str, ...] | None = None
    shapes: Mapping[str, ShapeSpec] | None = None
    calib: str | None = None
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    tokenizer: str | None = None
    seed: int | None = None
    rtol: float | None = None
    budget_s: float | None = None
    workers: int | None = None
    learned: object | None = None
    recipe_perms: Mapping[str, object] | None = None
    check: str | None = None
    cluster: str | None = None
    work_dir: str | None = None
    evaluate: bool | None = None
    progress: bool | None = None
    recover: object | None = None  # permsparse.recover.RecoverConfig: distil the written model from the input (None: off)

    @property
    def blockwise(self) -> bool:
        """True when the block-wise engine runs (reconstruction, output/block objectives, tuning or sequential)."""
        return bool(self.reconstruct == "sparsegpt" or self.objective in ("output", "block")
                    or self.finetune_epochs or self.sequential)

    @property
    def needs_calibration(self) -> bool:
        return self.importance in CALIBRATED_IMPORTANCES or self.blockwise

    def resolved(self) -> OptimizeConfig:
        """A copy with defaults filled in; raises :class:`UsageError` on any invalid option."""
        c = replace(
            self,
            method=self.method or "lsa",
            policy=self.policy or "local",
            pattern=NMPattern.parse(self.pattern) if self.pattern is not None else NMPattern(),
            importance=self.importance or "wanda",
            objective=self.objective or "importance",
            reconstruct=self.reconstruct or "sparsegpt",
            finetune_epochs=0 if self.finetune_epochs is None else int(self.finetune_epochs),
            finetune_lr=1e-4 if self.finetune_lr is None else float(self.finetune_lr),
            block_steps=30 if self.block_steps is None else int(self.block_steps),
            teacher=self.teacher or "dense",
            damp=DEFAULT_DAMP if self.damp is None else float(self.damp),
            mask=True if self.mask is None else bool(self.mask),
            prune_head=bool(self.prune_head),
            exclude=tuple(self.exclude or ()),
            calib_samples=128 if self.calib_samples is None else int(self.calib_samples),
            calib_seq_len=128 if self.calib_seq_len is None else int(self.calib_seq_len),
            seed=0 if self.seed is None else int(self.seed),
            rtol=DEFAULT_RTOL if self.rtol is None else float(self.rtol),
            check=self.check or "auto",
            cluster=self.cluster or "local",
            work_dir=None if self.work_dir is None else str(self.work_dir),
            evaluate=bool(self.evaluate),
            progress=True if self.progress is None else bool(self.progress),
        )
        _choice("method", c.method, METHODS)
        _choice("policy", c.policy, POLICIES)
        _choice("importance", c.importance, IMPORTANCES)
        _choice("objective", c.objective, OBJECTIVES)
        _choice("reconstruct", c.reconstruct, RECONSTRUCTIONS)
        _choice("teacher", c.teacher, TEACHERS)
        _choice("check", c.check, CHECKS)
        if c.cluster not in ("local", "auto") and not c.cluster.startswith("ray://"):
            raise UsageError(f"--cluster {c.cluster!r}: use local, auto (Ray) or ray://HOST:PORT (Ray client)")
        if c.sequential is None:
            c = replace(c, sequential=c.blockwise)
        if c.finetune_epochs < 0 or not c.finetune_lr > 0 or not 0 <= c.damp < 1:
            raise UsageError("--finetune-epochs must be >= 0, --finetune-lr > 0 and --damp in [0, 1)")
        if c.budget_s is not None and not c.budget_s > 0:
            raise UsageError(f"--budget-s must be > 0 seconds, got {c.budget_s:g}")
        if c.workers is not None and c.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {c.workers}")
        if c.calib_samples < 1 or c.calib_seq_len < 2:
            raise UsageError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
        if not 0 < c.rtol < 1:
            raise UsageError(f"--rtol must be in (0, 1), got {c.rtol:g}")
        if c.calib is not None and not c.needs_calibration:
            raise UsageError(
                f"--calib is only used by calibrated importances ({', '.join(sorted(CALIBRATED_IMPORTANCES))}); "
                f"with --importance {c.importance} it would be ignored: add --importance wanda, or drop --calib"
            )
        if c.objective == "output" and c.method not in ("learned", "identity"):
            raise UsageError("--objective output applies to --method learned only")
        if c.method == "identity" and c.policy != "local" and self.policy is not None:
            pass  # harmless: identity adds nothing whatever the policy
        if c.learned is not None:
            from permsparse.optimizer.learned import LearnedConfig

            if not isinstance(c.learned, LearnedConfig):
                raise UsageError("learned= must be a permsparse.optimizer.learned.LearnedConfig")
        return c

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly options (for recipes and provenance)."""
        out: dict[str, object] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("recipe_perms", "progress", "evaluate"):
                continue
            if isinstance(v, NMPattern):
                v = str(v)
            elif f.name == "shapes" and v is not None:
                v = [str(s) for s in v.values()]
            elif f.name in ("learned", "recover") and v is not None:
                from dataclasses import asdict

                v = asdict(v)  # type: ignore[call-overload]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"--{option} {value!r} is not one of: {', '.join(allowed)}")
