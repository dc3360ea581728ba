"""The training recipe: optimiser, schedules and normalisation, defaults = Gemma Scope (§3).

Every number the paper fixes is a field here, so a run's recipe is one small dataclass that is
saved with its checkpoints and its released SAEs:

* Adam with β = (0, 0.999), eps = 1e-8, learning rate 7e-5;
* learning-rate warm-up: cosine from 0.1·lr to lr over the first 1,000 steps, then constant.
  The paper describes no decay; an optional cosine decay over the last part of the run exists
  (``lr_decay_fraction``) and is off by default;
* sparsity coefficient λ warmed up linearly from 0 over the first 10,000 steps;
* batches of 4,096 activations, fp32 (``dtype="bfloat16"`` runs the forward/backward under
  bf16 autocast while weights and Adam state stay fp32);
* inputs divided by one scalar C per site with E‖x/C‖² = 1, estimated from the data before
  step 0 (see :attr:`Recipe.scale_estimate_tokens`);
* the decoder rule (project the gradient parallel to each decoder row out before each Adam step,
  renormalise the rows after it) and, for JumpReLU, θ₀ = 0.001, bandwidth ε = 0.001 and θ kept
  positive after every step.

The paper's runs are 1–4 million steps long; its warm-ups are 0.1% and 1% of that.  A short
run with the same absolute warm-ups would spend most or all of itself warming up, so
:meth:`Recipe.for_steps` caps them as fractions of the run (the one rule presets use).
"""

from __future__ import annotations

import math
from argparse import ArgumentTypeError
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

from saescope.settings import SITE_KINDS, check_kind_splits, kind_values, value_at

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Recipe:
    """How SAEs are trained (not what they are: that is :class:`saescope.sae.base.SAEConfig`)."""

    # --- optimiser ---
    lr: float = 7e-5
    adam_beta1: float = 0.0
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

    # --- learning-rate schedule ---
    #: cosine warm-up from ``lr_warmup_start * lr`` to ``lr`` over this many steps
    lr_warmup_steps: int = 1_000
    lr_warmup_start: float = 0.1
    #: optional (not in the paper): cosine decay over the final fraction of the run ...
    lr_decay_fraction: float = 0.0
    #: ... down to this fraction of ``lr``
    lr_decay_final: float = 0.0

    # --- sparsity coefficient schedule ---
    #: λ rises linearly from 0 to its target over this many steps
    sparsity_warmup_steps: int = 10_000
    #: the same for SAEs with a target L0 (Gemma Scope 2's quadratic penalty: 50,000 steps)
    target_l0_warmup_steps: int = 50_000

    # --- data ---
    batch_size: int = 4_096
    #: Adam steps per batch by site kind, e.g. ("mlp_out=2",): that kind's SAEs take each batch
    #: as 2 equal parts, one step each (twice the steps on the same tokens, at about the same
    #: FLOPs; warm-ups and decay keep their share of the run); other kinds take one step
    kind_splits: tuple[str, ...] = ()
    #: passes over the run's tokens by site kind, e.g. ("mlp_out=2",): that kind's SAEs go on
    #: through the source's next epoch (the same tokens, reshuffled) while the others stop after
    #: the first; the run lasts as long as its longest
    kind_epochs: tuple[str, ...] = ()
    #: "float32" (the paper) or "bfloat16" (autocast; fp32 master weights and optimiser state)
    dtype: str = "float32"
    #: C is estimated as sqrt(mean ‖x‖²) over at least this many tokens (whole batches) read
    #: from the start of the source before step 0.  2**17 tokens put the estimate of E‖x‖²
    #: within a fraction of a percent for activations whose squared norms vary by tens of
    #: percent, and cost a few dozen batches, negligible next to a run.
    scale_estimate_tokens: int = 131_072
    #: the fixed map inputs are trained behind: "scalar" (the paper: x/C, E‖x/C‖² = 1),
    #: "centred" ((x − mean)/C′), "diagonal" (per dimension: (x − mean)/σ_d/√D) or "fisher" (a full
    #: map weighing directions by the model's Fisher metric, saescope.activations.fisher); all give
    #: E‖x_n‖² = 1 (see saescope.sae.input_norm).  Folded exactly into the release.
    input_norm: str = "scalar"
    #: "diagonal" (and the diagonal part of "fisher"): dimension d is divided by σ_d to this power
    #: (1: full standardisation)
    input_norm_power: float = 1.0
    #: "fisher": the Fisher metric's share w of the map's metric (the rest is the diagonal map's)
    fisher_weight: float = 0.5
    #: "fisher": kept training tokens the Fisher metric is averaged over (one forward and
    #: backward of the model per ~512 of them, every site at once)
    fisher_tokens: int = 4_096
    #: "fisher": the SAE site kinds behind the Fisher map; SAEs at other kinds (and transcoders)
    #: are trained behind the diagonal map
    fisher_kinds: tuple[str, ...] = ("resid_post", "attn_z", "mlp_out")

    # --- SAE constraints and JumpReLU specifics ---
    #: project the parallel component out of W_dec's gradient, renormalise rows after the step
    decoder_unit_norm: bool = True
    #: JumpReLU: initial threshold θ₀ and the rectangle kernel's bandwidth ε (normalised units)
    threshold_init: float = 0.001
    bandwidth: float = 0.001
    #: JumpReLU: θ is clamped to at least this after every step (θ must stay positive)
    threshold_min: float = 1e-6
    #: JumpReLU θ at step 0: "fixed" (θ₀ for every latent: the paper) or "quantile" (SAEs with a
    #: target L0: each latent's θ at the (1 − L*/F) quantile of its pre-activations on the first
    #: batch, so the SAE fires L* latents per token from step 0; others keep θ₀)
    threshold_init_mode: str = "fixed"

    # --- Gemma Scope 2's high-frequency latent penalty (JumpReLU family; off by default) ---
    #: τ: latents whose running firing frequency exceeds this are penalised (None: no penalty)
    max_frequency: float | None = None
    #: β: the penalty's weight relative to λ (a latent at frequency 2τ gets an extra L0 weight β·λ)
    frequency_coefficient: float = 1.0
    #: the running firing frequency averages over about this many tokens (whole batches); keep it
    #: short: a lagging estimate keeps pushing a latent long after it fell below τ (measured: a
    #: 131k-token window on a 262k-token run left L0 at half its target and as many latents above τ)
    frequency_window_tokens: int = 8_192
    #: b_dec at step 0: "zeros" (the paper) or "mean" (the mean of the first batch, in
    #: normalised units).  The paper's runs are long enough for b_dec to learn the mean; a
    #: short CPU run is not, and Gemma's activations have a large mean (a few outlier
    #: dimensions), so an SAE starting at zero spends its short run learning it.
    b_dec_init: str = "zeros"
    #: after the last step, refit each SAE's decoder (W_dec, b_dec) by least squares to its own
    #: codes on this many tokens from the start of the run, keeping every latent's firing
    #: (saescope.train.refit; JumpReLU and BatchTopK SAEs; transcoders keep theirs).  0: off, the paper
    refit_tokens: int = 0

    # --- bookkeeping ---
    #: a latent is "dead" if it has not fired in this many tokens (or in the whole run so far,
    #: when the run is shorter, for the logged fraction); also TopK's AuxK dead threshold
    dead_window_tokens: int = 10_000_000

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            raise ValueError(f"Adam betas must lie in [0, 1), got ({self.adam_beta1}, {self.adam_beta2})")
        for name in ("lr_warmup_steps", "sparsity_warmup_steps", "target_l0_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr_warmup_start <= 1:
            raise ValueError(f"lr_warmup_start must lie in (0, 1], got {self.lr_warmup_start}")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ValueError(f"lr_decay_fraction must lie in [0, 1], got {self.lr_decay_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "kind_splits", tuple(self.kind_splits))  # JSON reads back a list
        object.__setattr__(self, "kind_epochs", tuple(self.kind_epochs))
        for name in ("kind_splits", "kind_epochs"):
            try:
                kind_values(getattr(self, name))
            except ArgumentTypeError as err:  # the message names what is wrong
                raise ValueError(f"{name}: {err}") from None
        check_kind_splits(self.kind_splits, self.batch_size, f"the batch of {self.batch_size}", "kind_splits:")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.scale_estimate_tokens < 1 or self.dead_window_tokens < 1:
            raise ValueError("scale_estimate_tokens and dead_window_tokens must be >= 1")
        if self.input_norm not in ("scalar", "centred", "diagonal", "fisher"):
            raise ValueError(f"input_norm must be 'scalar', 'centred', 'diagonal' or 'fisher', got {self.input_norm!r}")
        if not 0 <= self.fisher_weight <= 1:
            raise ValueError(f"fisher_weight must lie in [0, 1], got {self.fisher_weight}")
        object.__setattr__(self, "fisher_kinds", tuple(self.fisher_kinds))  # JSON reads back a list
        if set(self.fisher_kinds) - set(SITE_KINDS):
            raise ValueError(f"fisher_kinds must be among {', '.join(SITE_KINDS)}, got {', '.join(self.fisher_kinds)}")
        if self.fisher_tokens < 1:
            raise ValueError(f"fisher_tokens must be >= 1, got {self.fisher_tokens}")
        if self.refit_tokens < 0:
            raise ValueError(f"refit_tokens must be >= 0, got {self.refit_tokens}")
        if self.b_dec_init not in ("zeros", "mean"):
            raise ValueError(f"b_dec_init must be 'zeros' or 'mean', got {self.b_dec_init!r}")
        if self.threshold_init <= 0 or self.bandwidth <= 0 or self.threshold_min <= 0:
            raise ValueError("threshold_init, bandwidth and threshold_min must be > 0")
        if self.threshold_init_mode not in ("fixed", "quantile"):
            raise ValueError(f"threshold_init_mode must be 'fixed' or 'quantile', got {self.threshold_init_mode!r}")
        if self.max_frequency is not None and not 0 < self.max_frequency < 1:
            raise ValueError(f"max_frequency must lie in (0, 1) (a fraction of tokens), got {self.max_frequency}")
        if self.frequency_coefficient < 0 or self.frequency_window_tokens < 1:
            raise ValueError("frequency_coefficient must be >= 0 and frequency_window_tokens >= 1")

    # --- schedules ---------------------------------------------------------------------------

    def lr_at(self, step: int, n_steps: int | None = None) -> float:
        """Learning rate at (0-based) ``step`` of a run of ``n_steps`` (needed only for decay).

        Warm-up: lr·(s + (1 − s)·(1 − cos(π·step/W))/2) with s = ``lr_warmup_start``, so step 0
        gets s·lr and step W (and every later step) gets lr.
        """
        lr = self.lr
        if step < self.lr_warmup_steps:
            s = self.lr_warmup_start
            lr = self.lr * (s + (1 - s) * 0.5 * (1 - math.cos(math.pi * step / self.lr_warmup_steps)))
        if self.lr_decay_fraction > 0:
            if n_steps is None:
                raise ValueError("lr_at needs n_steps when lr_decay_fraction > 0")
            decay_steps = max(1, round(self.lr_decay_fraction * n_steps))
            start = n_steps - decay_steps
            if step >= start:
                t = min(1.0, (step - start) / decay_steps)
                final = self.lr_decay_final
                lr = lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t)))
        return lr

    def sparsity_factor_at(self, step: int, target_l0: bool = False) -> float:
        """Fraction of the target sparsity coefficient used at ``step``: step/W, capped at 1
        (W: ``target_l0_warmup_steps`` for an SAE with a target L0)."""
        warmup = self.target_l0_warmup_steps if target_l0 else self.sparsity_warmup_steps
        if step >= warmup:
            return 1.0
        return step / warmup

    # --- the short-run rule ------------------------------------------------------------------

    #: caps used by :meth:`for_steps`, as fractions of the run
    SHORT_RUN_LR_WARMUP: ClassVar[float] = 0.05
    SHORT_RUN_SPARSITY_WARMUP: ClassVar[float] = 0.2

    @classmethod
    def for_steps(cls, n_steps: int, **overrides: Any) -> Recipe:
        """The paper's recipe with its warm-ups shortened to fit a run of ``n_steps``.

        Rule: lr warm-up = min(1,000, 5% of the run); λ warm-up = min(10,000, 20% of the run)
        (rounded down), and for target-L0 SAEs min(50,000, 20% of the run).  Runs of 250,000+
        steps get the papers' values unchanged.

        Why these fractions: the released L0 is measured at the end of the run, so the SAE must
        spend most of the run at its full λ for L0 to settle where λ puts it — with a 20% λ
        warm-up, 80% of the steps train at the target.  The λ warm-up stays 4× the lr
        warm-up (the paper uses 10×) so reconstruction is learned at full lr before sparsity
        bites.  5% is already a long lr warm-up for Adam with β1 = 0, whose update size is set
        by β2's ~1,000-step memory; anything shorter than a few dozen steps only matters for
        runs too short to produce a useful SAE.  Explicit ``overrides`` win over the rule.
        """
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        base = cls()
        rule = {
            "lr_warmup_steps": min(base.lr_warmup_steps, int(cls.SHORT_RUN_LR_WARMUP * n_steps)),
            "sparsity_warmup_steps": min(base.sparsity_warmup_steps, int(cls.SHORT_RUN_SPARSITY_WARMUP * n_steps)),
            "target_l0_warmup_steps": min(base.target_l0_warmup_steps, int(cls.SHORT_RUN_SPARSITY_WARMUP * n_steps)),
        }
        rule.update(overrides)
        return cls(**rule)

    def splits_at(self, site) -> int:
        """Adam steps per batch for SAEs at ``site`` (``kind_splits``, by layer or kind; 1 if not named)."""
        return value_at(kind_values(self.kind_splits), site)

    def epochs_at(self, site) -> int:
        """Passes over the run's tokens for SAEs at ``site`` (``kind_epochs``, by layer or kind; 1 if not named)."""
        return value_at(kind_values(self.kind_epochs), site)

    def split(self, n: int) -> Recipe:
        """This recipe for SAEs taking each batch as ``n`` parts: batches of batch_size / n, the
        warm-ups ``n`` times as many (shorter) steps, so they span the same tokens."""
        if n == 1:
            return self
        return replace(self, batch_size=self.batch_size // n, kind_splits=(),
                       **{name: getattr(self, name) * n
                          for name in ("lr_warmup_steps", "sparsity_warmup_steps", "target_l0_warmup_steps")})

    # --- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown recipe field(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> Recipe:
        return replace(self, **changes)
