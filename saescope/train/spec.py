"""What to train: one :class:`SAESpec` per SAE, and sweeps of them.

A sweep is a list of specs (sites × widths × λ or k × architectures × seeds).  The trainer
groups them by site, so each site's batch is read once and fed to every SAE of that site.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from saescope.release.layout import width_label
from saescope.sae.transcoder import TRANSCODER_ARCHITECTURES, transcoder_architecture
from saescope.settings import PAIR_KINDS, check_kind_splits, kind_values, value_at
from saescope.sites import Site

#: architectures whose sparsity is set by k (latents per token) rather than a coefficient λ
K_ARCHITECTURES = frozenset({"topk", "batchtopk", "matryoshka_batchtopk", *TRANSCODER_ARCHITECTURES["batchtopk"]})
#: the architectures of transcoder sites
TRANSCODERS = frozenset(a for pair in TRANSCODER_ARCHITECTURES.values() for a in pair)
#: architectures trained with JumpReLU's objective: they take a target L0 (Gemma Scope 2's
#: quadratic) and the frequency penalty
JUMPRELU_FAMILY = frozenset({"jumprelu", "matryoshka_jumprelu", *TRANSCODER_ARCHITECTURES["jumprelu"]})
#: architectures made of nested dictionaries (they take ``prefixes``)
MATRYOSHKA = frozenset({"matryoshka_jumprelu", "matryoshka_batchtopk"})


@dataclass(frozen=True)
class SAESpec:
    """One SAE to train: where, which architecture, how wide, how sparse, which init seed.

    JumpReLU and ReLU take a ``sparsity_coefficient`` (λ; the L0 or L1 weight); TopK and
    BatchTopK take ``k``.  ``seed`` fixes the initialisation: two specs that differ only in λ
    start from the same weights, which makes a λ sweep a clean comparison.  The JumpReLU family
    may also take a ``target_l0`` (Gemma Scope 2: λ then weighs (‖f‖₀ − L*)² instead of ‖f‖₀);
    Matryoshka architectures take their nested widths ``prefixes`` (``()``: d_sae/16, d_sae/4).
    """

    site: Site
    architecture: str = "jumprelu"
    d_sae: int = 16_384
    sparsity_coefficient: float | None = None
    k: int | None = None
    seed: int = 0
    target_l0: float | None = None
    prefixes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.site, str):
            object.__setattr__(self, "site", Site.parse(self.site))
        if not isinstance(self.site, Site):
            raise ValueError(f"SAESpec.site must be a Site or a site name, got {self.site!r}")
        if self.d_sae < 1:
            raise ValueError(f"d_sae must be >= 1, got {self.d_sae}")
        if (self.architecture in TRANSCODERS) != (self.site.kind in PAIR_KINDS):
            raise ValueError(f"{self.architecture} at {self.site}: transcoder architectures "
                             f"({', '.join(sorted(TRANSCODERS))}) train at transcoder sites, and only they do")
        if self.architecture in K_ARCHITECTURES:
            if self.k is None or self.k < 1:
                raise ValueError(f"{self.architecture} SAE on {self.site} needs k >= 1, got {self.k}")
            if self.k > self.d_sae:
                raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae} for {self.site}")
        else:
            if self.sparsity_coefficient is None or self.sparsity_coefficient < 0:
                raise ValueError(
                    f"{self.architecture} SAE on {self.site} needs a sparsity coefficient >= 0, "
                    f"got {self.sparsity_coefficient}"
                )
        if self.target_l0 is not None:
            if self.architecture not in JUMPRELU_FAMILY:
                raise ValueError(f"a target L0 is for the JumpReLU family ({', '.join(sorted(JUMPRELU_FAMILY))}), "
                                 f"not {self.architecture}" + (" (set k instead)" if self.architecture in K_ARCHITECTURES
                                                               else ""))
            if not 0 < self.target_l0 <= self.d_sae:
                raise ValueError(f"target L0 {self.target_l0:g} for {self.site} must lie in (0, d_sae = {self.d_sae}]")
        if self.architecture in MATRYOSHKA:
            from saescope.sae.prefixes import check_prefixes

            object.__setattr__(self, "prefixes", check_prefixes(self.prefixes, self.d_sae))
        elif self.prefixes:
            raise ValueError(f"prefixes are for Matryoshka architectures ({', '.join(sorted(MATRYOSHKA))}), "
                             f"not {self.architecture}")

    @property
    def sparsity_label(self) -> str:
        if self.architecture in K_ARCHITECTURES:
            return f"k{self.k}"
        if self.target_l0 is not None:
            return f"l0target{self.target_l0:g}"
        return f"lambda{self.sparsity_coefficient:g}"

    @property
    def name(self) -> str:
        """Readable and file-name safe, e.g. ``layer_12.resid_post.jumprelu.16k.lambda0.001.seed0``."""
        return (
            f"layer_{self.site.layer}.{self.site.kind}.{self.architecture}."
            f"{width_label(self.d_sae)}.{self.sparsity_label}.seed{self.seed}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site.name,
            "architecture": self.architecture,
            "d_sae": self.d_sae,
            "sparsity_coefficient": self.sparsity_coefficient,
            "k": self.k,
            "seed": self.seed,
            # only when set, so that the identity of runs without them is what it always was
            **({"target_l0": self.target_l0} if self.target_l0 is not None else {}),
            **({"prefixes": list(self.prefixes)} if self.prefixes else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAESpec:
        return cls(**{**d, **({"prefixes": tuple(d["prefixes"])} if "prefixes" in d else {})})


def sweep(
    sites: Iterable[Site],
    widths: Iterable[int],
    *,
    architecture: str = "jumprelu",
    sparsity_coefficients: Iterable[float] = (),
    ks: Iterable[int] = (),
    kind_ks: Iterable[str] = (),
    target_l0s: Iterable[float] = (),
    prefixes: Iterable[int] = (),
    seed: int = 0,
    skip_connection: bool = False,
) -> list[SAESpec]:
    """Every site × width × (λ, k or target L0) for one architecture, in a stable order.  At
    transcoder sites the architecture becomes its transcoder (``jumprelu`` -> ``jumprelu_transcoder``,
    or ``jumprelu_skip_transcoder`` with ``skip_connection``; likewise ``batchtopk``).

    With ``target_l0s`` (JumpReLU family) there is one SAE per target, each with the one λ of
    ``sparsity_coefficients`` as the quadratic's weight.  ``kind_ks`` (``'attn_z=85'``,
    ``'mlp_out@13=150'``, …; k architectures): the one k of those sites, in place of ``ks``."""
    sites = list(sites)
    k_of_kind = kind_values(kind_ks)
    if k_of_kind and architecture not in K_ARCHITECTURES:
        raise ValueError(f"a k per site kind is for {', '.join(sorted(K_ARCHITECTURES))}, not {architecture}")
    if any(site.kind in PAIR_KINDS for site in sites):
        transcoder_architecture(architecture, skip_connection)  # refuses topk and relu at once
    targets = [float(t) for t in target_l0s]
    coefficients = [float(c) for c in sparsity_coefficients]
    prefixes = tuple(prefixes)
    if targets:
        if architecture not in JUMPRELU_FAMILY:
            hint = " (use k: it is the L0)" if architecture in K_ARCHITECTURES else ""
            raise ValueError(f"a target L0 is for the JumpReLU family ({', '.join(sorted(JUMPRELU_FAMILY))}), "
                             f"not {architecture}{hint}")
        if len(coefficients) != 1:
            raise ValueError(f"a target-L0 sweep takes exactly one sparsity coefficient, the quadratic's λ "
                             f"(--l0-coefficients; 0.01 on CPU: docs/gemma-scope-2.md), got {len(coefficients)}")
    values = list(ks) if architecture in K_ARCHITECTURES else (targets or coefficients)
    k_at = {site: value_at(k_of_kind, site, 0) for site in sites}  # 0: no k of its own
    if not values and not (k_of_kind and all(k_at.values())):
        what = "k values" if architecture in K_ARCHITECTURES else "sparsity coefficients or target L0s"
        raise ValueError(f"a {architecture} sweep needs at least one of its {what}")
    extra = {"prefixes": prefixes} if architecture in MATRYOSHKA else {}
    if prefixes and not extra:
        raise ValueError(f"prefixes are for Matryoshka architectures ({', '.join(sorted(MATRYOSHKA))}), "
                         f"not {architecture}")
    specs = []
    for site in sites:
        arch = transcoder_architecture(architecture, skip_connection) if site.kind in PAIR_KINDS else architecture
        for width in widths:
            for value in ([k_at[site]] if k_at[site] else values):
                if architecture in K_ARCHITECTURES:
                    specs.append(SAESpec(site, arch, width, k=int(value), seed=seed, **extra))
                elif targets:
                    specs.append(SAESpec(site, arch, width, sparsity_coefficient=coefficients[0],
                                         target_l0=float(value), seed=seed, **extra))
                else:
                    specs.append(SAESpec(site, arch, width, sparsity_coefficient=float(value), seed=seed, **extra))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate SAEs in sweep: {', '.join(duplicates)}")
    return specs


def check_recipe_fits(specs: Iterable[SAESpec], recipe, rows_per_step: int) -> None:
    """Refuse a recipe the specs cannot train under (``recipe``: a
    :class:`~saescope.train.recipe.Recipe`; ``rows_per_step``: this process's rows per batch)."""
    specs = list(specs)
    others = sorted({s.architecture for s in specs} - JUMPRELU_FAMILY)
    if recipe.max_frequency is not None and others:
        raise ValueError(f"the frequency penalty (max_frequency) acts on JumpReLU thresholds; "
                         f"{', '.join(others)} SAEs cannot take it")
    check_kind_splits(recipe.kind_splits, rows_per_step, f"the {rows_per_step} rows of this process's batch",
                      "kind_splits:")
