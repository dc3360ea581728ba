"""Named presets for ``saescope run``: what to train, on what, for how long.

A preset is a :class:`RunConfig`; command-line flags override its fields.  The CPU presets are
sized for the embedded default (Gemma 3 270M, 54 sites) on 2 cores; the GPU presets copy the
paper's settings (Gemma Scope §3: 16.4K width, 4B tokens, batch 4,096, the recipe's warm-ups)
and need the Hugging Face hub (or a local copy of the model) and a large corpus.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from saescope.settings import (TrainSettings, at_least, check_kind_splits, finite, kind_values, layer_list, optional,
                               positive_int)


@dataclass(frozen=True)
class RunConfig(TrainSettings):
    """Everything ``saescope run`` needs (its training settings are :class:`TrainSettings`'s).
    Stages: tokens → activations → train → eval → report → features."""

    #: 'gemma-3-270m', a local model folder, a .gguf file or a hub id
    model: str = "gemma-3-270m"
    #: training corpus ('wiki-vital', 'python-docs', a path, 'hf:<name>'; '+' joins); held-out
    #: evaluation tokens come from a disjoint set of documents
    corpus: str = "wiki-vital"
    #: held-out evaluation corpus (its subsets are reported separately: the paper's per-subset analysis)
    eval_corpus: str = "wiki-vital+python-docs"
    #: held-out tokens for evaluation
    eval_tokens: int = field(default=8_192, metadata={"parse": positive_int})
    #: held-out tokens scored for the LM-loss metrics (delta loss, CE recovered, KL): each SAE
    #: costs one partial forward plus Gemma's 262k-word head per token; none = every eval token
    eval_loss_tokens: int | None = field(default=1_024, metadata={"parse": optional(positive_int)})
    #: precision of the model's forwards for the loss metrics: float32 or bfloat16 (autocast)
    eval_dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})
    #: zero-ablation forward per site, for CE loss recovered
    zero_ablation: bool = True
    #: tokens scanned for the feature browser
    feature_tokens: int = field(default=16_384, metadata={"parse": positive_int})
    #: online: activations computed while training (no disk); store: harvest to disk first
    source: str = field(default="online", metadata={"choices": ("online", "store")})
    #: on-disk activation dtype
    store_dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})
    #: canonical SAE per site = average L0 closest to this (the paper's rule uses 100)
    canonical_l0: float = field(default=100.0, metadata={"parse": at_least(0, finite)})
    #: collect per-latent feature data for the browser
    features: bool = True
    description: str = field(default="", metadata={"flag": False})

    def __post_init__(self) -> None:
        if self.source not in ("online", "store"):
            raise ValueError(f"source must be 'online' or 'store', got {self.source!r}")
        if self.train_tokens is not None and self.train_tokens < self.batch_size:
            raise ValueError(f"train_tokens ({self.train_tokens}) is below one batch ({self.batch_size})")
        if not self.widths:
            raise ValueError("no SAE width given")
        # refused before any stage runs (the recipe, built at the train stage, checks it too)
        check_kind_splits(self.kind_splits, self.batch_size, f"the batch of {self.batch_size}", "--kind-split")
        kind_values(self.kind_ks)
        kind_values(self.kind_epochs)

    @property
    def n_steps(self) -> int:
        if self.train_tokens is None:
            raise ValueError("a run needs train_tokens (--tokens)")
        return self.train_tokens // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("description")
        return d

    def replace(self, **changes: Any) -> "RunConfig":
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown run setting(s): {', '.join(unknown)}")
        return replace(self, **changes)

    def overridden(self, **changes: Any) -> "RunConfig":
        """:meth:`replace` as the command line means it: a per-kind list (``--kind-k``,
        ``--kind-split``, ``--kind-epochs``) changes the kinds it names and keeps the preset's other kinds."""
        for name in ("kind_ks", "kind_splits", "kind_epochs"):
            if name in changes:
                given = kind_values(changes[name])
                kept = {term: n for term, n in kind_values(getattr(self, name)).items()
                        if not any(_covers(new, term) for new in given)}
                changes[name] = tuple(f"{term}={n}" for term, n in {**kept, **given}.items())
        return self.replace(**changes)


def _covers(given: str, preset: str) -> bool:
    """Whether a command line's per-kind term replaces a preset's: ``mlp_out`` replaces every
    ``mlp_out`` term (``mlp_out@13`` too); ``mlp_out@12-17`` replaces ``mlp_out`` terms sharing a layer."""
    kind, at, layers = given.partition("@")
    other, other_at, other_layers = preset.partition("@")
    if kind != other:
        return False
    if not at or not other_at:
        return not at or given == preset
    return bool(set(layer_list(layers)) & set(layer_list(other_layers)))


#: What the CPU presets share beyond :class:`TrainSettings`' defaults — each a measured departure
#: from the paper's recipe for runs of ~10^5 tokens instead of 10^9 (docs/fidelity.md has the
#: figures, benchmarks/fidelity.py reproduces them):
#:
#: * BatchTopK with k = the wanted L0, released as a JumpReLU (its inference code is one: θ is
#:   calibrated on the last batch).  A JumpReLU threshold moves ~lr per step and lands at L0
#:   176–540 in a short run whatever λ; k puts the L0 where it is asked from step 0.
#: * a per-dimension input map (σ_d^0.5, centred): Gemma 3's few massive dimensions dominate the
#:   MSE under the paper's scalar C, while the LM loss depends on the others.
#: * batch 1,024 and lr 2e-3: four times the steps for the same tokens; 7e-5 barely moves in
#:   a few hundred steps.
#: * the "fisher" input map (half the metric the model's Fisher at the site, half the diagonal
#:   map's): the MSE then weighs each direction by what an error there costs the LM loss; at
#:   equal budget it cut delta loss 25–35% on layer 13 and 17 mlp_out and resid_post.
#:   At every kind, attn_z included: on layer 6 alone the Fisher map raised attn_z's FVU 0.302 ->
#:   0.325 for a delta loss within noise, but in the default run attn_z behind the diagonal map
#:   (and k 85) reached CE recovered >= 0.9 at 8/18 sites, against 13/18 behind the Fisher map.
#: * a cosine lr decay over the last 20%: behind the Fisher map, two of 54 attn_z SAEs of the
#:   default run (layers 12, 17) diverged in the last ~30 steps at a constant lr 2e-3 (held-out FVU
#:   0.33 at step 96, 1.7 at step 128).
_CPU = dict(architecture="batchtopk", sparsity_coefficients=(), input_norm="fisher", input_norm_power=0.5,
            fisher_weight=0.5, batch_size=1_024, lr=2e-3, lr_decay_fraction=0.2, device="cpu")

#: The CPU recipe for Gemma Scope 2's target L0 (JumpReLU, λ·(2/L*)·(L0 − L*)²), measured on layer 6
#: at 256 steps × 1,024 tokens (docs/gemma-scope-2.md; benchmarks/gemma_scope_2.py):
#:
#: * θ starts at each latent's (1 − L*/F) quantile of its first-batch pre-activations, so the SAE
#:   fires L* per token from step 0 (θ₀ = 0.001 needs ~lr per step to climb, and a short run ends
#:   first);
#: * λ = 0.01: at 0.001 the L0 drifted to 1.3× target 20 during the λ warm-up and came back only
#:   slowly; at 0.01 it stays within ~10% of 20, 60 and 150 from step 30 on;
#: * a cosine lr decay over the last 30%: with lr 2e-3 to the end, θ jitters by ~lr per step and
#:   the released weights' L0 on one batch fell 11% below the run's average (134 vs 151).
CPU_TARGET_L0 = dict(_CPU, input_norm="diagonal", architecture="jumprelu", sparsity_coefficients=(1e-2,),
                     threshold_init_mode="quantile", lr_decay_fraction=0.3)

#: What every Gemma 2 2B preset shares: the paper's recipe and evaluation (§3, §4) on a GPU.
_GEMMA_2_2B_PAPER = RunConfig(
    model="google/gemma-2-2b",
    corpus="hf:monology/pile-uncopyrighted",
    eval_corpus="hf:monology/pile-uncopyrighted",
    eval_tokens=2_048 * 1_024,
    eval_loss_tokens=None,
    feature_tokens=10_000_000,
    seq_len=1_024,
    batch_size=4_096,
    source="store",
    device="cuda",
    checkpoint_every=10_000,
    lr=7e-5,
    b_dec_init="zeros",
)

PRESETS: dict[str, RunConfig] = {
    # The embedded default on 2 CPU cores (29 min on an AMX Xeon, runs/d16; 58 min on an AVX-512
    # EPYC before kind_epochs, beta1 0.9 and the 16k-token Fisher pass; the goal is 30): every
    # site of Gemma 3 270M, one SAE per site at L0 ~ 100; CE recovered >= 0.9 at 53 of 54.
    # Training is ~10·d_in·width FLOPs per token per SAE; evaluation pays one partial forward
    # plus the 262k-word head per SAE, site (zero ablation) and loss token.
    "default": RunConfig(
        description="Embedded default on CPU: 54 sites, BatchTopK->JumpReLU k=100 (attn_z 85, mlp_out 140), "
                    "width 2048, 197k tokens of wiki-vital+python-docs",
        widths=(2048,),
        ks=(100,),
        # the released JumpReLU's held-out L0 per k, measured at k = 100 (runs/d6): attn_z 1.21-1.65
        # (7 sites above 150), resid_post 1.10-1.29, mlp_out 0.86-1.22; and mlp_out gains most
        # from a larger k (layer 13: CE recovered 0.80 -> 0.85 at k 100 -> 150)
        # mlp_out 120 -> 140 and two Adam steps per batch for mlp_out and resid_post: runs/d10 -> d11
        # (CE recovered min / median at mlp_out 0.84 / 0.92 -> 0.86 / 0.94; the split costs
        # 1-2 min; docs/fidelity.md "More Adam steps on the same tokens")
        kind_ks=("attn_z=85", "mlp_out=140"),
        kind_splits=("mlp_out=2", "resid_post=2"),
        # a second, reshuffled epoch for mlp_out, Adam beta1 0.9 and the Fisher metric from 16k
        # tokens: side by side with runs/d12 on 16,611 held-out loss tokens, delta loss fell at all
        # 10 sites measured (mlp_out 12-17: 1-33%, KL 16-28%; resid_post 12, 17: 8-9%; attn_z 12,
        # 17) and mlp_out 12 and 15 crossed CE recovered 0.9 (docs/fidelity.md, 2026-12-03).
        # A third mlp_out epoch (runs/d14 against runs/d13, 16,611 held-out loss tokens): KL fell
        # at all 18 mlp_out sites, CE recovered >= 0.9 at 17 of 18 (15 with two), for 6.3 more
        # minutes (docs/fidelity.md, 2026-12-04). Layer 13's mlp_out, the one site short of 0.9
        # with three (0.889-0.890 in runs/d14 and d16), gets six: alone, 3 -> 5 -> 8 epochs gave
        # CE recovered 0.898 -> 0.914 -> 0.930 on the same held-out tokens, ~9 s per epoch here
        kind_epochs=("mlp_out=3", "mlp_out@13=6"),
        adam_beta1=0.9,
        train_tokens=196_608,
        # train on the mix the run evaluates on (disjoint documents): trained on wiki-vital alone,
        # CE recovered on held-out python-docs was far below wiki's (runs/d9 -> runs/d10: CE >= 0.9
        # at resid_post 17 -> 18, attn_z 13 -> 18, mlp_out 4 -> 12 of 18 sites; docs/fidelity.md)
        corpus="wiki-vital+python-docs",
        fisher_tokens=16_384,
        eval_tokens=8_192,
        eval_loss_tokens=4_096,
        eval_dtype="bfloat16",
        feature_tokens=8_192,
        seq_len=256,
        dtype="bfloat16",
        **_CPU,
        # 64 steps (~3.5 min of the first epoch): each checkpoint of the 54 SAEs costs 6-10 s,
        # and at 32 they cost ~35 s of the run
        checkpoint_every=64,
    ),
    # 3.5-11 minutes on 2 CPU cores (four machines measured): the same pipeline, smaller everything (a smoke test).
    "quick": RunConfig(
        description="Smoke run on CPU: 54 sites, BatchTopK->JumpReLU k=64, width 512, 16k tokens (3.5-11 min)",
        widths=(512,),
        ks=(64,),
        train_tokens=16_384,
        eval_tokens=1_024,
        eval_loss_tokens=256,
        feature_tokens=2_048,
        seq_len=128,
        **{**_CPU, "batch_size": 256, "lr": 3e-3},
        fisher_tokens=1_024,
        checkpoint_every=16,
    ),
    # The paper's recipe on Gemma 2 2B (Gemma Scope Table 1: all sites at 16.4K width, 4B
    # tokens; λ swept to give several L0s).  Needs a GPU, the hub (or a local copy of the
    # model) and a corpus of billions of tokens (e.g. 'hf:monology/pile-uncopyrighted').
    "gemma-2-2b-16k": _GEMMA_2_2B_PAPER.replace(
        description="Gemma Scope recipe: Gemma 2 2B, all 78 sites, 16.4K width, 4B tokens, λ sweep",
        widths=(16_384,),
        sparsity_coefficients=(2e-4, 4e-4, 6e-4, 1e-3, 2e-3),
        train_tokens=4_000_000_000,
    ),
    # The paper's residual-stream ladder for one layer (Gemma Scope Fig. 4 style).
    "gemma-2-2b-res12-ladder": _GEMMA_2_2B_PAPER.replace(
        description="Gemma 2 2B residual layer 12, widths 16K–524K, 8B tokens, λ sweep",
        sites="layer_12/resid_post",
        widths=(16_384, 32_768, 65_536, 131_072, 262_144, 524_288),
        sparsity_coefficients=(4e-4, 6e-4, 1e-3),
        train_tokens=8_000_000_000,
    ),
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]
