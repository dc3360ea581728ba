"""The contract every SAE architecture meets, and what they share.

Conventions (Gemma Scope's released files, row-vector ``x @ W``):

* ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc`` (d_sae), ``b_dec`` (d_in);
  JumpReLU adds ``threshold`` (d_sae).
* Training form (``centre_input=True``): pre-activations ``(x - b_dec) @ W_enc + b_enc`` on
  inputs divided by a fixed scalar C (E‖x/C‖² = 1).
* Release form (``centre_input=False``): pre-activations ``x @ W_enc + b_enc`` on *raw*
  activations, exactly what Gemma Scope's ``params.npz`` files expect.  :meth:`SAE.fold_input_scale`
  turns the first into the second without changing any prediction (latents are scaled by C).

Shape suffixes: B batch, D d_in, F d_sae (features / latents).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn


#: architecture name → its config class, filled by :func:`saescope.sae.registry.register`
#: (``saescope.sae``'s ``__init__`` imports the registry, so the built-ins are always there)
CONFIG_CLASSES: dict[str, type[SAEConfig]] = {}


class _ConfigMeta(type):
    """``SAEConfig(...)`` on the base class builds the config class registered for its
    ``architecture``, dropping options that belong to other architectures, so call sites that
    pass the old flat set (``k=``, ``bandwidth=``, …) for any architecture keep working."""

    def __call__(cls, *args, **kwargs):
        if cls is not SAEConfig:
            return super().__call__(*args, **kwargs)
        names = [f.name for f in fields(SAEConfig)]
        kwargs.update(zip(names, args))
        target = config_class(kwargs.get("architecture", "jumprelu"))
        own = {f.name for f in fields(target)}
        others = {f.name for c in CONFIG_CLASSES.values() for f in fields(c)} - own
        return super(_ConfigMeta, target).__call__(**{k: v for k, v in kwargs.items() if k not in others})


def config_class(architecture: str) -> type[SAEConfig]:
    """The config class registered for ``architecture`` (the base class if none is)."""
    return CONFIG_CLASSES.get(architecture, SAEConfig)


@dataclass
class SAEConfig(metaclass=_ConfigMeta):
    """What defines an SAE's shape and behaviour (not how it is trained): the options every
    architecture shares.  Each architecture's own options live in a subclass next to it
    (:class:`~saescope.sae.jumprelu.JumpReLUConfig`, :class:`~saescope.sae.topk.TopKConfig`),
    paired with it in :mod:`saescope.sae.registry`."""

    d_in: int
    d_sae: int
    architecture: str = "jumprelu"
    #: training form subtracts b_dec before the encoder; the folded release form does not
    centre_input: bool = True
    #: free-form provenance (model, site, …); saved in config.json, never used in maths
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """From :meth:`to_dict`'s output or an older config.json's ``sae_config``: on the base
        class the architecture's own config class; keys that class lacks are ignored."""
        target = config_class(d.get("architecture", "jumprelu")) if cls is SAEConfig else cls
        known = {f.name for f in fields(target)}
        return target(**{k: v for k, v in d.items() if k in known})


@dataclass
class LossOutput:
    """A training step's loss and its parts.  ``total`` is what gets back-propagated."""

    total: torch.Tensor  # scalar
    mse: torch.Tensor  # ‖x − x̂‖² summed over D, mean over B (detached)
    sparsity: torch.Tensor  # sparsity penalty incl. its coefficient (detached)
    aux: torch.Tensor  # auxiliary loss, e.g. TopK's dead-latent loss; 0 if none (detached)
    l0: torch.Tensor  # mean active latents per token (detached)
    fired_F: torch.Tensor  # per-latent count of activations in this batch (int64, detached)
    x_hat_BD: torch.Tensor  # reconstruction (detached), for metrics such as FVU


class SAE(nn.Module):
    """Base class: parameters, decoder constraint, fold, array round-trip.

    Subclasses implement :meth:`encode` and :meth:`loss`, set ``architecture``, and may add
    parameters (``array_names`` lists what goes into ``params.npz``).
    """

    architecture: ClassVar[str] = ""
    #: reads one site and predicts another (:mod:`saescope.sae.transcoder`); its loss takes a target
    is_transcoder: ClassVar[bool] = False
    #: latents can be rescaled one by one without changing predictions (per-latent gates, no
    #: ranking across latents): the release fold then makes every decoder row unit-norm
    latents_rescalable: ClassVar[bool] = False
    array_names: ClassVar[tuple[str, ...]] = ("W_enc", "W_dec", "b_enc", "b_dec")

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        D, F = cfg.d_in, cfg.d_sae
        D_out = getattr(cfg, "d_out", None) or D  # a transcoder predicts another site (its cfg.d_out)
        self.W_enc = nn.Parameter(torch.empty(D, F))
        self.W_dec = nn.Parameter(torch.empty(F, D_out))
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_dec = nn.Parameter(torch.zeros(D_out))
        #: tokens since each latent last fired: the one dead-latent counter.  It lives on the SAE
        #: so it travels with it (state_dict, device, latent shards) and TopK's AuxK reads it;
        #: :class:`~saescope.train.sae_trainer.SAETrainer` advances it after every step
        self.register_buffer("tokens_since_fired_F", torch.zeros(F, dtype=torch.int64))
        self.reset_parameters()

    # --- initialisation --------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Gemma Scope's init: W_dec He-uniform with unit-norm rows, W_enc = W_decᵀ, zero biases."""
        bound = math.sqrt(6.0 / self.cfg.d_sae)  # He-uniform, fan_in = d_sae for the decoder
        self.W_dec.uniform_(-bound, bound, generator=generator)
        self.normalize_decoder_()
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # --- the maths every architecture shares -------------------------------------------------

    def pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        if self.cfg.centre_input:
            x_BD = x_BD - self.b_dec
        return x_BD @ self.W_enc + self.b_enc

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return f_BF @ self.W_dec + self.b_dec

    def predict(self, x_BD: torch.Tensor, f_BF: torch.Tensor | None = None) -> torch.Tensor:
        """The output for input ``x`` from its latents ``f`` (computed if not given): ``decode(f)``;
        a skip transcoder adds ``x·W_skip``.  Code that splices or measures an SAE's output calls
        this, so a skip path is never left out."""
        return self.decode(self.encode(x_BD) if f_BF is None else f_BF)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.predict(x_BD)

    @torch.no_grad()
    def mean_l0(self, x_BD: torch.Tensor) -> float:
        """Mean number of firing latents per token of the inference code (a latent shard sums
        over its group)."""
        return float((self.encode(x_BD) != 0).sum(-1).double().mean())

    def loss(self, x_BD: torch.Tensor, sparsity_coefficient: float) -> LossOutput:
        """The training loss on (normalised) ``x``; a transcoder's also takes ``target_BD=y``."""
        raise NotImplementedError

    @torch.no_grad()
    def update_dead_(self, fired_F: torch.Tensor, n_tokens: int) -> None:
        """Advance the dead-latent counter by a batch of ``n_tokens`` whose per-latent firing
        counts are ``fired_F`` (a loop of one's own calls it after each step, as SAETrainer does)."""
        self.tokens_since_fired_F.add_(n_tokens).masked_fill_(fired_F.to(self.tokens_since_fired_F.device) > 0, 0)

    # --- decoder constraint ------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (after each optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out of W_dec's gradient the component parallel to each row (before each step)."""
        if self.W_dec.grad is None:
            return
        W_dec_FD, grad_FD = self.W_dec, self.W_dec.grad
        # g ← g − (g·w / w·w) w, row by row, with one F×D temporary
        coef_F1 = (grad_FD * W_dec_FD).sum(dim=1, keepdim=True) / W_dec_FD.norm(dim=1, keepdim=True).square().clamp_min(1e-24)
        grad_FD.addcmul_(W_dec_FD, coef_F1, value=-1.0)

    # --- release form ------------------------------------------------------------------------

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Turn a training-form SAE (inputs x/C, centred) into release form (raw x, uncentred).

        With C = ``scale``: b_enc′ = C·(b_enc − b_dec·W_enc), b_dec′ = C·b_dec, θ′ = C·θ (in
        subclasses that have θ); W_enc, W_dec unchanged.  Afterwards ``encode(x)`` equals
        C·``encode_before(x/C)`` and ``forward(x)`` equals C·``forward_before(x/C)``.
        """
        if self.cfg.centre_input:
            self.b_enc.sub_(self.b_dec @ self.W_enc)
            self.cfg.centre_input = False
        self.b_enc.mul_(scale)
        self.b_dec.mul_(scale)
        self._fold_extra(scale)

    def _fold_extra(self, scale: float) -> None:
        """Hook for architecture-specific parameters in raw units (JumpReLU's threshold)."""
        self._scale_latents_(torch.full((self.cfg.d_sae,), float(scale), device=self.W_enc.device))

    def _scale_latents_(self, n_F: torch.Tensor) -> None:
        """Multiply architecture-specific per-latent parameters (thresholds) by ``n_F``."""

    @torch.no_grad()
    def fold_input_norm(self, norm) -> None:
        """Release form for an SAE trained behind any :class:`saescope.sae.input_norm.InputNorm`."""
        from saescope.sae.input_norm import fold_input_norm

        fold_input_norm(self, norm)

    # --- arrays (params.npz) -----------------------------------------------------------------

    def to_arrays(self) -> dict[str, torch.Tensor]:
        """The released arrays, float32, on CPU (names as in Gemma Scope's files)."""
        return {name: getattr(self, name).detach().float().cpu() for name in self.array_names}

    @torch.no_grad()
    def load_arrays(self, arrays: dict[str, Any]) -> None:
        for name in self.array_names:
            getattr(self, name).copy_(torch.as_tensor(arrays[name]))
