"""Configuration of ``optimize``: what the user asked, and what the run does.

:class:`OptimizeConfig` is what a user writes (CLI flags, the Python API, a recipe's options): one flat frozen
dataclass, ``None`` meaning "the default". :func:`resolve` turns it, once, into a :class:`ResolvedConfig`: five typed,
frozen stage configs (:class:`PermutationConfig`, :class:`MaskConfig`, :class:`CalibConfig`,
:class:`ReconstructionConfig`, :class:`CheckConfig`) plus recovery, with every default filled in and every option
validated (a :class:`UsageError` says which option is wrong and what is allowed). It runs twice with the same code:
before any work without the model (so the CLI and the API refuse bad options at once), and after the graph is
analyzed with the model's :class:`ModelFacts`, where the model-dependent defaults are decided (text encoders get
more calibration texts and block tuning; models without Transformer blocks, or with an op the torch evaluator lacks,
fall back to plain masking; models whose inputs are neither token ids nor images fall back to magnitude masking).
Every later step reads only the resolved config; it is what the recipe and ``--json`` report (:meth:`ResolvedConfig.
to_dict`, flat, with the option names of :class:`OptimizeConfig`, so a recipe replays as the options it records).

The registries of allowed values live with the code that implements them (:data:`~permsparse.optimizer.methods.
METHOD_FACTORIES`, :data:`~permsparse.optimizer.importance.IMPORTANCE_REGISTRY`); the name tuples here are read from
them, for the CLI and for validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from permsparse.errors import UsageError
from permsparse.ir.compare import DEFAULT_RTOL
from permsparse.optimizer.hessian import DEFAULT_DAMP
from permsparse.optimizer.importance import IMPORTANCE_REGISTRY
from permsparse.optimizer.methods import METHOD_FACTORIES
from permsparse.pattern import NMPattern

if TYPE_CHECKING:
    import torch

    from permsparse.ir.shapes import ShapeSpec
    from permsparse.recover.config import RecoverConfig


#: Names the CLI offers; methods and importances are read from their registries (nothing heavy loads).
METHODS: tuple[str, ...] = tuple(METHOD_FACTORIES)
IMPORTANCES: tuple[str, ...] = tuple(name for name, imp in IMPORTANCE_REGISTRY.items() if imp.offered)
POLICIES: tuple[str, ...] = ("fold", "global", "local")
OBJECTIVES: tuple[str, ...] = ("importance", "output", "block")
RECONSTRUCTIONS: tuple[str, ...] = ("sparsegpt", "none")
TEACHERS: tuple[str, ...] = ("dense", "local")
CHECKS: tuple[str, ...] = ("auto", "whole", "blocks")
#: Importances that need calibration data (per-channel activation norms or Hessians).
CALIBRATED_IMPORTANCES = frozenset(name for name in IMPORTANCES if IMPORTANCE_REGISTRY[name].needs != "weights")

#: The one source of every model-independent default.
DEFAULTS: Mapping[str, Any] = {
    "method": "lsa", "policy": "local", "importance": "wanda", "objective": "importance", "reconstruct": "sparsegpt",
    "finetune_epochs": 0, "finetune_lr": 1e-4, "block_steps": 30, "teacher": "dense", "damp": DEFAULT_DAMP,
    "mask": True, "prune_head": False, "calib_samples": 128, "calib_seq_len": 128, "seed": 0, "rtol": DEFAULT_RTOL,
    "check": "auto", "cluster": "local", "evaluate": False, "progress": True, "device": "cpu",
}
#: Model-dependent defaults of text encoders (short texts: 32 of them under-determine H = XᵀX of a 1536-wide input;
#: MiniLM, bench/quality.py: 128 texts and 4 epochs of tuning lift the pooled cosine 0.859 -> 0.905).
ENCODER_CALIB_SAMPLES = 128
ENCODER_FINETUNE_EPOCHS = 4
ENCODER_FINETUNE_LR = 3e-4
#: Options that, when the user gives one, keep the model-dependent calibration defaults from changing anything.
CALIBRATION_OPTIONS = ("importance", "reconstruct", "objective", "finetune_epochs", "sequential", "calib")


@dataclass(frozen=True)
class OptimizeConfig:
    """Settings of ``permsparse optimize`` as the user gives them (``None`` means the default; see :func:`resolve`).

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
            unless the weights are over ~1 GB in fp32, or the model cannot be run block by block); default auto.
        cluster: where units are solved: ``local`` (a reusable pool of this machine's processes), ``auto`` (Ray: the
            running cluster, else a local Ray instance) or ``ray://HOST:PORT`` (Ray client); default local.
        work_dir: keep every solved unit there (keyed by its weights, method, options and seed) and reuse it when the
            run is started again, e.g. after it was killed; default None (nothing kept).
        evaluate: after writing, measure plain N:M and the result against the dense input on held-out data
            (``--report``); default False.
        progress: progress bars; default True.
        device: torch device of every torch stage (block calibration, Hessians, SparseGPT, block tuning, the
            permutation learners): ``cpu``, ``cuda`` or ``auto`` (:data:`permsparse.devices.DEVICES`); default cpu.
            onnxruntime steps (whole-model calibration, the fold check) stay on the CPU.
        recover: :class:`permsparse.recover.RecoverConfig`: distil the written model from the input (None: off).
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
    device: str | None = None
    recover: RecoverConfig | None = None

    def resolved(self, facts: ModelFacts | None = None) -> ResolvedConfig:
        """:func:`resolve` of these options (``facts``: the model's, for its model-dependent defaults)."""
        return resolve(self, facts)


# ------------------------------------------------------------------------------------------------ stage configs


@dataclass(frozen=True)
class PermutationConfig:
    """How permutations are found (method, objective, solver) and realized (policy)."""

    method: str
    policy: str
    objective: str
    block_steps: int
    learned: object | None = None
    recipe_perms: Mapping[str, object] | None = None
    budget_s: float | None = None
    workers: int | None = None
    cluster: str = "local"
    work_dir: str | None = None


@dataclass(frozen=True)
class MaskConfig:
    """Which weights are pruned, with which pattern and mask importance; ``apply`` False writes the permuted dense
    model."""

    pattern: NMPattern
    importance: str
    apply: bool = True
    prune_head: bool = False
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: ``source`` (None: built-in real text / images), ``samples`` examples of ``seq_len`` tokens."""

    source: str | None
    samples: int
    seq_len: int
    tokenizer: str | None = None


@dataclass(frozen=True)
class ReconstructionConfig:
    """Block-wise reconstruction: ``method`` (sparsegpt | none), sequential calibration, dampening, block targets and
    the tuning of kept weights with masks frozen."""

    method: str
    sequential: bool
    damp: float
    teacher: str
    finetune_epochs: int
    finetune_lr: float


@dataclass(frozen=True)
class CheckConfig:
    """The fold check: tolerance, how the model is run (``mode``: auto | whole | blocks), and fixed input shapes."""

    rtol: float
    mode: str
    shapes: Mapping[str, ShapeSpec] | None = None


@dataclass(frozen=True)
class ModelFacts:
    """What the model-dependent defaults depend on, found by the pipeline's analysis (:func:`permsparse.pipeline.
    read.model_facts`).

    Attributes:
        kind: ``text`` (encoder), ``lm`` (decoder) or ``image`` (:func:`permsparse.data.kinds.model_kind`); None
            when the inputs are neither token ids nor images (``kind_error`` says why).
        has_blocks: Transformer blocks were found (None: not looked for, the run is not block-wise).
        missing_ops: ops of the graph the torch evaluator lacks (block-wise steps run blocks in PyTorch).
    """

    kind: str | None
    kind_error: str | None = None
    has_blocks: bool | None = None
    missing_ops: tuple[str, ...] = ()


#: ``OptimizeConfig`` option -> (stage config, its field) in :class:`ResolvedConfig`.
OPTION_FIELDS: Mapping[str, tuple[str, str]] = {
    "method": ("permutation", "method"), "policy": ("permutation", "policy"),
    "objective": ("permutation", "objective"), "block_steps": ("permutation", "block_steps"),
    "learned": ("permutation", "learned"), "recipe_perms": ("permutation", "recipe_perms"),
    "budget_s": ("permutation", "budget_s"), "workers": ("permutation", "workers"),
    "cluster": ("permutation", "cluster"), "work_dir": ("permutation", "work_dir"),
    "pattern": ("mask", "pattern"), "importance": ("mask", "importance"), "mask": ("mask", "apply"),
    "prune_head": ("mask", "prune_head"), "exclude": ("mask", "exclude"),
    "calib": ("calibration", "source"), "calib_samples": ("calibration", "samples"),
    "calib_seq_len": ("calibration", "seq_len"), "tokenizer": ("calibration", "tokenizer"),
    "reconstruct": ("reconstruction", "method"), "sequential": ("reconstruction", "sequential"),
    "damp": ("reconstruction", "damp"), "teacher": ("reconstruction", "teacher"),
    "finetune_epochs": ("reconstruction", "finetune_epochs"), "finetune_lr": ("reconstruction", "finetune_lr"),
    "rtol": ("check", "rtol"), "check": ("check", "mode"), "shapes": ("check", "shapes"),
    "seed": ("", "seed"), "evaluate": ("", "evaluate"), "progress": ("", "progress"), "recover": ("", "recover"),
    "device": ("", "device"),
}


@dataclass(frozen=True)
class ResolvedConfig:
    """Every option of one ``optimize`` run, resolved once (:func:`resolve`) and read by every step.

    Attributes:
        permutation / mask / calibration / reconstruction / check: the stage configs.
        seed: seed of every random choice.
        device: torch device of the torch stages as the user named it (``cpu``, ``cuda``, ``auto``; see
            :attr:`torch_device`).
        recover: the recovery stage's config (None: off).
        evaluate / progress: held-out evaluation after writing (``--report``); progress bars.
        notes: ``(level, message)`` of each model-dependent default that was applied, and why (the pipeline logs
            them once, at that level: ``warning`` where a fallback loses quality).
    """

    permutation: PermutationConfig
    mask: MaskConfig
    calibration: CalibConfig
    reconstruction: ReconstructionConfig
    check: CheckConfig
    seed: int = 0
    device: str = "cpu"
    recover: RecoverConfig | None = None
    evaluate: bool = False
    progress: bool = True
    notes: tuple[tuple[str, str], ...] = ()

    @property
    def torch_device(self) -> torch.device:
        """:attr:`device` as a torch device (``auto``: cuda when torch sees one, else cpu)."""
        from permsparse.devices import resolve_device

        return resolve_device(self.device)

    @property
    def pattern(self) -> NMPattern:
        return self.mask.pattern

    @property
    def blockwise(self) -> bool:
        """True when the block-wise engine runs (reconstruction, output/block objectives, tuning or sequential)."""
        r = self.reconstruction
        return bool(r.method == "sparsegpt" or self.permutation.objective in ("output", "block")
                    or r.finetune_epochs or r.sequential)

    @property
    def needs_calibration(self) -> bool:
        return self.mask.importance in CALIBRATED_IMPORTANCES or self.blockwise

    def option(self, name: str) -> Any:
        """The resolved value of ``OptimizeConfig`` option ``name``."""
        group, attr = OPTION_FIELDS[name]
        return getattr(getattr(self, group) if group else self, attr)

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly options, flat under :class:`OptimizeConfig`'s names (recipes, ``--json``, provenance)."""
        out: dict[str, object] = {}
        for f in fields(OptimizeConfig):
            if f.name in ("recipe_perms", "progress", "evaluate"):
                continue
            v = self.option(f.name)
            if isinstance(v, NMPattern):
                v = str(v)
            elif f.name == "shapes" and v is not None:
                v = [str(s) for s in v.values()]
            elif f.name in ("learned", "recover") and v is not None:
                v = asdict(v)  # type: ignore[call-overload]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def resolve(given: OptimizeConfig, facts: ModelFacts | None = None) -> ResolvedConfig:
    """``given`` with every default filled in and validated; with ``facts``, the model-dependent defaults too.

    The model-dependent defaults never change an option the user gave: a calibrated default on a model whose inputs
    are neither token ids nor images falls back to magnitude masking; a text encoder without any calibration option
    gets :data:`ENCODER_CALIB_SAMPLES` texts and :data:`ENCODER_FINETUNE_EPOCHS` epochs of block tuning; block-wise
    defaults on a model without Transformer blocks (or with an op the torch evaluator lacks) fall back to plain
    masking. Each one is recorded in :attr:`ResolvedConfig.notes` (a warning where it loses quality).
    """
    v = {f.name: getattr(given, f.name) for f in fields(OptimizeConfig)}
    for name, default in DEFAULTS.items():
        if v[name] is None:
            v[name] = default
    v["pattern"] = NMPattern.parse(v["pattern"]) if v["pattern"] is not None else NMPattern()
    for name, cast in (("finetune_epochs", int), ("block_steps", int), ("calib_samples", int),
                       ("calib_seq_len", int), ("seed", int), ("finetune_lr", float), ("damp", float),
                       ("rtol", float), ("mask", bool), ("prune_head", bool), ("evaluate", bool),
                       ("progress", bool)):
        v[name] = cast(v[name])
    v["exclude"] = tuple(v["exclude"] or ())
    v["work_dir"] = None if v["work_dir"] is None else str(v["work_dir"])
    _validate(v, given)
    if v["sequential"] is None:
        v["sequential"] = _blockwise(v)
    notes: list[tuple[str, str]] = []
    if facts is not None:
        _model_defaults(v, given, facts, notes)
    return ResolvedConfig(
        permutation=PermutationConfig(v["method"], v["policy"], v["objective"], v["block_steps"], v["learned"],
                                      v["recipe_perms"], v["budget_s"], v["workers"], v["cluster"], v["work_dir"]),
        mask=MaskConfig(v["pattern"], v["importance"], v["mask"], v["prune_head"], v["exclude"]),
        calibration=CalibConfig(v["calib"], v["calib_samples"], v["calib_seq_len"], v["tokenizer"]),
        reconstruction=ReconstructionConfig(v["reconstruct"], bool(v["sequential"]), v["damp"], v["teacher"],
                                            v["finetune_epochs"], v["finetune_lr"]),
        check=CheckConfig(v["rtol"], v["check"], v["shapes"]),
        seed=v["seed"], device=v["device"], recover=v["recover"], evaluate=v["evaluate"], progress=v["progress"],
        notes=tuple(notes),
    )


def _blockwise(v: Mapping[str, Any]) -> bool:
    return bool(v["reconstruct"] == "sparsegpt" or v["objective"] in ("output", "block") or v["finetune_epochs"]
                or v["sequential"])


def _validate(v: dict[str, Any], given: OptimizeConfig) -> None:
    _choice("method", v["method"], METHODS)
    _choice("policy", v["policy"], POLICIES)
    _choice("importance", v["importance"], IMPORTANCES)
    _choice("objective", v["objective"], OBJECTIVES)
    _choice("reconstruct", v["reconstruct"], RECONSTRUCTIONS)
    _choice("teacher", v["teacher"], TEACHERS)
    _choice("check", v["check"], CHECKS)
    if v["device"] != "cpu":  # the default never imports torch here
        from permsparse.devices import resolve_device

        resolve_device(v["device"])  # unknown name, or cuda without a GPU: UsageError now, before any work
    if v["cluster"] not in ("local", "auto") and not v["cluster"].startswith("ray://"):
        raise UsageError(f"--cluster {v['cluster']!r}: use local, auto (Ray) or ray://HOST:PORT (Ray client)")
    if v["finetune_epochs"] < 0 or not v["finetune_lr"] > 0 or not 0 <= v["damp"] < 1:
        raise UsageError("--finetune-epochs must be >= 0, --finetune-lr > 0 and --damp in [0, 1)")
    if v["budget_s"] is not None and not v["budget_s"] > 0:
        raise UsageError(f"--budget-s must be > 0 seconds, got {v['budget_s']:g}")
    if v["workers"] is not None and v["workers"] < 1:
        raise UsageError(f"--workers must be >= 1, got {v['workers']}")
    if v["calib_samples"] < 1 or v["calib_seq_len"] < 2:
        raise UsageError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    if not 0 < v["rtol"] < 1:
        raise UsageError(f"--rtol must be in (0, 1), got {v['rtol']:g}")
    needs_calibration = v["importance"] in CALIBRATED_IMPORTANCES or _blockwise(
        {**v, "sequential": v["sequential"] or False})
    if v["calib"] is not None and not needs_calibration:
        raise UsageError(
            f"--calib is only used by calibrated importances ({', '.join(sorted(CALIBRATED_IMPORTANCES))}); "
            f"with --importance {v['importance']} it would be ignored: add --importance wanda, or drop --calib"
        )
    if v["objective"] == "output" and v["method"] not in ("learned", "identity"):
        raise UsageError("--objective output applies to --method learned only")
    if v["learned"] is not None:
        from permsparse.optimizer.learned import LearnedConfig

        if not isinstance(v["learned"], LearnedConfig):
            raise UsageError("learned= must be a permsparse.optimizer.learned.LearnedConfig")


def _model_defaults(v: dict[str, Any], given: OptimizeConfig, facts: ModelFacts,
                    notes: list[tuple[str, str]]) -> None:
    """The model-dependent defaults (see :func:`resolve`), applied to the option values ``v`` in place."""
    needs_calibration = v["importance"] in CALIBRATED_IMPORTANCES or _blockwise(v)
    if needs_calibration and not any(getattr(given, k) is not None for k in CALIBRATION_OPTIONS):
        if facts.kind is None:
            notes.append(("warning", f"{facts.kind_error}. Falling back to --importance magnitude --reconstruct none."))
            v.update(importance="magnitude", reconstruct="none", sequential=False)
        elif facts.kind == "text" and _blockwise(v) and given.calib is None:
            v.update(calib_samples=given.calib_samples or ENCODER_CALIB_SAMPLES,
                     finetune_epochs=ENCODER_FINETUNE_EPOCHS, finetune_lr=given.finetune_lr or ENCODER_FINETUNE_LR)
            notes.append(("info", f"text encoder: {v['calib_samples']} calibration texts, {v['finetune_epochs']} "
                                  "epochs of block tuning (defaults for encoders)"))
    asked = any(getattr(given, k) is not None for k in CALIBRATION_OPTIONS[1:5])
    if _blockwise(v) and not asked and facts.has_blocks is not None and (not facts.has_blocks or facts.missing_ops):
        why = (f"the torch evaluator lacks op(s) {', '.join(facts.missing_ops)}" if facts.has_blocks else
               "no Transformer blocks found (no residual-stream tensor cuts the graph)")
        notes.append(("warning", f"{why}: weights are masked without reconstruction (the default --reconstruct "
                                 "sparsegpt needs blocks run in PyTorch)"))
        v.update(reconstruct="none", sequential=False, finetune_epochs=0)


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"--{option} {value!r} is not one of: {', '.join(allowed)}")


__all__ = [
    "CALIBRATED_IMPORTANCES", "CHECKS", "DEFAULTS", "IMPORTANCES", "METHODS", "OBJECTIVES", "POLICIES",
    "RECONSTRUCTIONS", "TEACHERS", "CalibConfig", "CheckConfig", "MaskConfig", "ModelFacts", "OptimizeConfig",
    "PermutationConfig", "ReconstructionConfig", "ResolvedConfig", "resolve",
]
