"""Settings of ``permsparse recover`` (one frozen dataclass; ``None`` means the default, :meth:`resolved` fills them)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from permsparse.devices import DEVICES, PRECISIONS
from permsparse.errors import UsageError

RECOVER_PARAMS = ("all", "norms")

#: the one source of every default
DEFAULTS = dict(
    steps=None, minutes=None, params="all", lr=None, device="cpu", calib=None, tokenizer=None, work_dir=None,
    batch_size=4, seq_len=128, stop_samples=16, eval_every=None, warmup=0.05, weight_decay=0.0, hidden_weight=1.0,
    top_k=64, seed=0, progress=True, max_windows=4096, checkpoint=None, precision="auto",
)
DEFAULT_STEPS = 100  # when neither steps nor minutes is given
#: ``checkpoint=None`` (auto) checkpoints the blocks' activations when the student trains more values than this:
#: small models (all-MiniLM-L6-v2: 5.3 M kept values) skip the recomputation, which costs ~20 % of a step, and their
#: activations are small; SmolLM2-135M (53 M) keeps checkpointing (its 4 GB memory goal).
CHECKPOINT_ABOVE_VALUES = 20_000_000
#: masked weights are rebuilt by a scatter over precomputed kept positions (int64: 8 bytes per kept value) up to
#: this many kept values, by ``masked_scatter`` above it (no index memory; ~4x slower on the CPU)
INDEX_MAX_VALUES = 64_000_000
#: Peak AdamW learning rates. Encoders: 2e-4 — on all-MiniLM-L6-v2, 10 minutes of recovery (~1,100 steps) reach an
#: out-of-domain pooled cosine of 0.905 (2e-4) and 0.907 (5e-4) where 5e-5 reached 0.861 in 564 steps
#: (bench/results/recovery-minilm.md). Decoders: 4e-4 — SmolLM2-135M from the one-shot defaults, 30 minutes of
#: recovery (~460 steps, bf16 products) reach 1.70x / 1.71x dense perplexity (Wikipedia / out of domain) at 4e-4,
#: 1.81x / 1.76x at 2e-4, 1.91x / 1.83x at 1e-4 (one run each; bench/results/recovery-smollm2.md). Higher rates
#: are not measured.
DEFAULT_LR = {"decoder": {"all": 4e-4, "norms": 1e-3}, "encoder": {"all": 2e-4, "norms": 1e-3}}


def default_lr(kind: str, params: str) -> float:
    """The default learning rate of a model of data kind ``kind`` ("lm": a decoder; else an encoder)."""
    return DEFAULT_LR["decoder" if kind == "lm" else "encoder"][params]


@dataclass(frozen=True)
class RecoverConfig:
    """Whole-model sparse distillation with frozen masks (see :mod:`permsparse.recover`)."""

    steps: int | None = None  # optimizer steps (default 100 unless ``minutes`` is given)
    minutes: float | None = None  # wall-clock budget instead of (or capping) steps
    params: str | None = None  # "all": kept weights + biases + norms; "norms": only norms and biases (PERP)
    lr: float | None = None  # AdamW peak learning rate (default: DEFAULT_LR by model kind and params)
    device: str | None = None  # cpu (default) | cuda | auto
    calib: str | None = None  # training text: a .txt / .jsonl / .json file or a folder of .txt (default: built-in)
    tokenizer: str | None = None  # the model's tokenizer folder (default: beside the model)
    work_dir: str | None = None  # checkpoints and the teacher cache; a killed recovery resumes from it
    batch_size: int | None = None  # sequences per step (default 4)
    seq_len: int | None = None  # tokens per sequence (default 128)
    stop_samples: int | None = None  # sequences of the early-stopping slice (never trained on; default 16)
    eval_every: int | None = None  # steps between held-out evaluations (default: 4 evaluations per run)
    warmup: float | None = None  # share of the run spent warming the learning rate up (default 0.05)
    weight_decay: float | None = None  # AdamW weight decay (default 0)
    hidden_weight: float | None = None  # weight of the per-block hidden-state term (default 1)
    top_k: int | None = None  # teacher logits kept per token for the KL term (default 64)
    seed: int | None = None
    progress: bool | None = None  # one tqdm bar (default True)
    max_windows: int | None = None  # training sequences read at most (default 4096; they are cycled)
    checkpoint: bool | None = None  # activation checkpointing per block (None: above CHECKPOINT_ABOVE_VALUES)
    precision: str | None = None  # auto (bf16 autocast where native, else fp32) | fp32 | bf16 (default auto)

    def resolved(self) -> RecoverConfig:
        """Every field filled, values checked (:class:`UsageError` naming the option)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in DEFAULTS.items():
            if values[k] is None:
                values[k] = v
        if values["params"] not in RECOVER_PARAMS:
            raise UsageError(f"--recover-params must be one of {', '.join(RECOVER_PARAMS)}, got {values['params']!r}")
        if values["device"] not in DEVICES:
            raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {values['device']!r}")
        if values["precision"] not in PRECISIONS:
            raise UsageError(f"--recover-precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {values['precision']!r}")
        if values["steps"] is None and values["minutes"] is None:
            values["steps"] = DEFAULT_STEPS
        if values["steps"] is not None and int(values["steps"]) < 1:
            raise UsageError(f"--recover-steps must be at least 1, got {values['steps']}")
        if values["minutes"] is not None and not float(values["minutes"]) > 0:
            raise UsageError(f"--recover-minutes must be positive, got {values['minutes']}")
        for k in ("lr", "batch_size", "seq_len", "stop_samples", "top_k", "max_windows"):
            if k == "lr" and values[k] is None:
                continue  # filled by recover once the model's kind is known (default_lr)
            if not values[k] > 0:
                raise UsageError(f"recover option {k} must be positive, got {values[k]}")
        if not 0 <= values["warmup"] < 1:
            raise UsageError(f"recover warmup must be in [0, 1), got {values['warmup']}")
        return replace(self, **values)

    @property
    def budget_s(self) -> float | None:
        return None if self.minutes is None else float(self.minutes) * 60.0


__all__ = ["CHECKPOINT_ABOVE_VALUES", "DEFAULTS", "DEFAULT_LR", "DEVICES", "INDEX_MAX_VALUES", "PRECISIONS",
           "RECOVER_PARAMS", "RecoverConfig", "default_lr"]
