"""Transcoders (Gemma Scope App. B, Gemma Scope 2): read the MLP's input x, predict its output y.

    f = JumpReLU(x·W_enc + b_enc)            (per-latent threshold θ, as a JumpReLU SAE)
    ŷ = f·W_dec + b_dec                       transcoder
    ŷ = f·W_dec + b_dec + x·W_skip            skip (affine) transcoder

Shapes: ``W_enc`` (d_in, F), ``W_dec`` (F, d_out), ``b_enc`` (F), ``b_dec`` (d_out), ``threshold``
(F), ``W_skip`` (d_in, d_out).  What differs from an SAE, and nothing else (pseudo-derivatives,
warm-ups, decoder rule and Adam are the SAE recipe's):

* no b_dec is subtracted before the encoder (it lives in the target's space): ``centre_input``
  is always False, in training and in the release;
* W_enc is not initialised as W_decᵀ: its columns are an independent draw of unit vectors;
* the loss compares ŷ with the target: ‖y − ŷ‖² + λ·L0 (JumpReLU), or + AuxK (BatchTopK, trained
  as the CPU presets train SAEs and released as a JumpReLU transcoder);
* x and y each get their own fixed map (the paper's scalars C_in, C_out, or per-dimension
  maps), folded into the released weights by :meth:`fold_io_norms` — exactly: the release on
  raw x predicts raw y as the trained transcoder did on the normalised ones.

``W_skip`` starts at zero and is trained by plain autograd outside the fused JumpReLU step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from saescope.sae.base import LossOutput
from saescope.sae.batchtopk import BatchTopKSAE
from saescope.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saescope.sae.input_norm import rescale_latents_
from saescope.sae.jumprelu_step import jumprelu_step
from saescope.sae.topk import TopKConfig

#: what each SAE architecture becomes at a transcoder site: (plain, skip)
TRANSCODER_ARCHITECTURES = {"jumprelu": ("jumprelu_transcoder", "jumprelu_skip_transcoder"),
                            "batchtopk": ("batchtopk_transcoder", "batchtopk_skip_transcoder")}


def transcoder_architecture(architecture: str, skip: bool) -> str:
    """The transcoder architecture trained for ``architecture`` (``jumprelu`` or ``batchtopk``,
    or already a transcoder's name) at a transcoder site."""
    if architecture in {a for pair in TRANSCODER_ARCHITECTURES.values() for a in pair}:
        return architecture
    if architecture not in TRANSCODER_ARCHITECTURES:
        raise ValueError(f"transcoders train as jumprelu or batchtopk, not {architecture!r} (--arch)")
    return TRANSCODER_ARCHITECTURES[architecture][bool(skip)]


@dataclass
class JumpReLUTranscoderConfig(JumpReLUConfig):
    architecture: str = "jumprelu_transcoder"
    centre_input: bool = False
    #: width of the predicted site (None: d_in)
    d_out: int | None = None


@dataclass
class JumpReLUSkipTranscoderConfig(JumpReLUTranscoderConfig):
    architecture: str = "jumprelu_skip_transcoder"


@dataclass
class BatchTopKTranscoderConfig(TopKConfig):
    architecture: str = "batchtopk_transcoder"
    centre_input: bool = False
    d_out: int | None = None


@dataclass
class BatchTopKSkipTranscoderConfig(BatchTopKTranscoderConfig):
    architecture: str = "batchtopk_skip_transcoder"


class _Transcoder:
    """What every transcoder adds to its SAE class (a mixin placed before it)."""

    is_transcoder = True
    latents_rescalable = True
    skip: ClassVar[bool] = False

    def _setup(self) -> None:
        if self.cfg.centre_input:
            raise ValueError("a transcoder never subtracts b_dec before its encoder: centre_input must be False")
        self.cfg.d_out = int(self.W_dec.shape[1])
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(self.cfg.d_in, self.cfg.d_out))

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """W_dec He-uniform with unit-norm rows; W_enc an independent draw with unit-norm columns
        (not W_decᵀ: App. B); zero biases; W_skip zero."""
        bound = math.sqrt(6.0 / self.cfg.d_sae)
        self.W_dec.uniform_(-bound, bound, generator=generator)
        self.normalize_decoder_()
        enc_FD = torch.empty(self.cfg.d_sae, self.cfg.d_in).uniform_(-bound, bound, generator=generator)
        self.W_enc.copy_((enc_FD / enc_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)).T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if getattr(self, "W_skip", None) is not None:
            self.W_skip.zero_()

    def predict(self, x_BD: torch.Tensor, f_BF: torch.Tensor | None = None) -> torch.Tensor:
        out = self.decode(self.encode(x_BD) if f_BF is None else f_BF)
        return out + x_BD @ self.W_skip if self.skip else out

    def _target(self, target_BD):
        if target_BD is None:
            raise ValueError("a transcoder's loss needs its target: loss(x, coefficient, target_BD=y)")
        return target_BD

    # --- release form ------------------------------------------------------------------------

    def fold_input_scale(self, scale: float) -> None:
        """Release form after training with input and target both divided by one scalar C:
        :meth:`fold_io_norms` with that scalar on both sides (latents × C)."""
        from saescope.sae.input_norm import InputNorm

        self.fold_io_norms(InputNorm.from_scale(scale, self.cfg.d_in), InputNorm.from_scale(scale, self.cfg.d_out))

    def fold_input_norm(self, norm) -> None:
        raise ValueError("a transcoder folds two maps, its input's and its target's: use fold_io_norms")

    @torch.no_grad()
    def fold_io_norms(self, input_norm, target_norm) -> None:
        """Release form on raw activations, in place, from training on x_n = (x − s)⊙g (input
        map) predicting y_n = (y − t)⊙h (target map):

        π = x·(diag(g)·W_enc) + [b_enc − (s⊙g)·W_enc];  y = f·(W_dec ⊘ h) + x·(diag(g)·W_skip ⊘ h)
        + [(b_dec − (s⊙g)·W_skip) ⊘ h + t]; then latent i × n_i = ‖row i of W_dec‖ (W_enc's column,
        b_enc and θ by n_i, the row by 1/n_i), so released decoder rows are unit-norm.  Latents come
        out × n_i (× C_out under scalar maps)."""
        if input_norm.matrix_DD is not None or target_norm.matrix_DD is not None:
            raise ValueError("transcoders train behind the scalar, centred or diagonal maps, not 'fisher'")
        g, s = input_norm.gain_D.to(self.W_enc), input_norm.shift_D.to(self.W_enc)
        h, t = target_norm.gain_D.to(self.W_enc), target_norm.shift_D.to(self.W_enc)
        self.b_enc.sub_((s * g) @ self.W_enc)
        self.W_enc.mul_(g[:, None])
        if self.skip:
            self.b_dec.sub_((s * g) @ self.W_skip)
            self.W_skip.mul_(g[:, None]).div_(h[None, :])
        self.W_dec.div_(h[None, :])
        self.b_dec.div_(h).add_(t)
        rescale_latents_(self, target_norm.gain_D)


class JumpReLUTranscoder(_Transcoder, JumpReLUSAE):
    architecture = "jumprelu_transcoder"

    def __init__(self, cfg: JumpReLUTranscoderConfig, step_path: str = "auto"):
        super().__init__(cfg, step_path)
        self._setup()

    def loss(self, x_BD: torch.Tensor, sparsity_coefficient: float, *, target_BD: torch.Tensor | None = None) -> LossOutput:
        """‖y − ŷ‖² (summed over d_out, mean over B) + λ·L0 through the fused JumpReLU step, or
        JumpReLU's options (a target L0, the frequency penalty: :meth:`JumpReLUSAE.objective`)."""
        y_BD = self._target(target_BD)
        y_hat_BD, l0_B, fired_F = jumprelu_step(
            x_BD, self.W_enc, self.W_dec, self.b_enc, self.b_dec, self.threshold,
            bandwidth=self.cfg.bandwidth, centre_input=False, path=self.step_path, counts=True,
            counts_straight_through=self.cfg.max_frequency is not None,
        )
        if self.skip:
            y_hat_BD = y_hat_BD + x_BD.to(self.W_skip.dtype) @ self.W_skip
        return self.objective(y_BD, y_hat_BD, l0_B, fired_F, sparsity_coefficient)


class JumpReLUSkipTranscoder(JumpReLUTranscoder):
    architecture = "jumprelu_skip_transcoder"
    skip = True
    array_names = JumpReLUSAE.array_names + ("W_skip",)


class BatchTopKTranscoder(_Transcoder, BatchTopKSAE):
    """Trained with a batch-level top-k (as the CPU presets' SAEs), released as a JumpReLU
    transcoder with the calibrated threshold (:meth:`to_jumprelu`)."""

    architecture = "batchtopk_transcoder"
    jumprelu_class: ClassVar[type] = JumpReLUTranscoder

    def __init__(self, cfg: BatchTopKTranscoderConfig):
        super().__init__(cfg)
        self._setup()

    def loss(self, x_BD: torch.Tensor, sparsity_coefficient: float = 0.0, *,
             target_BD: torch.Tensor | None = None) -> LossOutput:
        y_BD = self._target(target_BD)
        pre_BF = self.pre_activations(x_BD)
        f_BF = self._batch_topk(pre_BF)
        y_hat_BD = self.predict(x_BD, f_BF)
        mse = (y_hat_BD - y_BD).pow(2).sum(dim=-1).mean()
        active_BF = f_BF > 0
        aux = self.aux_loss(pre_BF, (y_BD - y_hat_BD).detach())
        if self.training:
            self.update_threshold_(f_BF)
        weighted_aux = self.cfg.aux_coefficient * aux
        return LossOutput(total=mse + weighted_aux, mse=mse.detach(), sparsity=torch.zeros((), device=x_BD.device),
                          aux=weighted_aux.detach(), l0=active_BF.sum(dim=-1).float().mean(),
                          fired_F=active_BF.sum(dim=0), x_hat_BD=y_hat_BD.detach())

    @torch.no_grad()
    def to_jumprelu(self):
        """The same transcoder as a JumpReLU transcoder (every latent of every token unchanged)."""
        cls = self.jumprelu_class
        cfg = (JumpReLUSkipTranscoderConfig if cls.skip else JumpReLUTranscoderConfig)(
            self.cfg.d_in, self.cfg.d_sae, d_out=self.d_out,
            metadata={**self.cfg.metadata, "trained_as": self.architecture, "k": self.cfg.k})
        out = cls(cfg)
        out.load_arrays(self.to_arrays())
        return out.to(self.W_enc.device)


class BatchTopKSkipTranscoder(BatchTopKTranscoder):
    architecture = "batchtopk_skip_transcoder"
    skip = True
    array_names = BatchTopKSAE.array_names + ("W_skip",)
    jumprelu_class = JumpReLUSkipTranscoder
