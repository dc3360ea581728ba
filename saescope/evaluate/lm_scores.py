"""Next-token CE and KL(clean ‖ other) without keeping (tokens × vocabulary) log-probabilities.

For a linear head (logits l = W h, optionally + b), with p the clean distribution and h′ the
final hidden state of another forward (spliced or zero-ablated):

    CE′ = lse(l′) − l′[target]                    lse = log Σᵥ exp(lᵥ)
    KL(p ‖ p′) = Σᵥ pᵥ (log pᵥ − l′ᵥ + lse(l′)) = −H(p) − (pᵀW)·h′ − p·b + lse(l′)

so the clean pass keeps, per scored token, −H(p), the D-vector pᵀW and p·b, and every other
forward needs only its logits' log-sum-exp and one dot product: no log-softmax over the
vocabulary, and no clean log-probs held in memory (Gemma's vocabulary is 262k words).  The
matrix product pᵀW costs one extra head-sized product, once per batch for all SAEs.

Heads with a non-linearity (Gemma 2's final logit soft-capping), and logits computed under bf16
autocast, take the direct route: the clean probabilities of the batch are kept, and every other
forward pays one log-softmax and one dot product p·log p′ over the vocabulary.

Two CPU details decide the speed (measured on Gemma 3's 262k-word head, 2 cores): the
log-sum-exp is read off ``log_softmax`` (lse(l′) = l′[t] − log p′[t]), whose fused kernel is ~5×
faster than ``torch.logsumexp`` on real logits; and probabilities are ``exp`` of log-probs clamped
at −87, because ``exp`` of arguments below that underflows into subnormals, which vector units
handle ~10× slower.  The clamp adds at most V·e⁻⁸⁷ ≈ 10⁻³² to the total mass.
"""

from __future__ import annotations

import torch
from torch import nn

from saescope.forward import lm_logits


#: smallest log-probability exponentiated: e^-87 is the last normal float32 (see the module docstring)
_LOG_P_FLOOR = -87.0


def probabilities(log_probs: torch.Tensor) -> torch.Tensor:
    """exp(log_probs) without subnormal results (a new tensor)."""
    return log_probs.clamp(min=_LOG_P_FLOOR).exp_()


def head_is_linear(model: nn.Module) -> bool:
    """True when the fast route applies: logits = W h (+ b) with no soft-capping, in float32
    (in lower precision the logits and the float64 dot product would disagree by ~1e-2)."""
    head = model.get_output_embeddings()
    return not getattr(model.config, "final_logit_softcapping", None) and head.weight.dtype == torch.float32


class CleanReference:
    """The clean forward's next-token predictions at M scored positions, kept compactly.

    ``ce_clean_M`` is the clean CE; :meth:`score` returns (CE, KL(clean ‖ other)) for another
    forward's final hidden states at the same positions.  Work goes in chunks of
    ``chunk_tokens`` rows, so no temporary exceeds chunk_tokens × vocabulary floats.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, hidden_MD: torch.Tensor, targets_M: torch.Tensor, chunk_tokens: int,
                 exact_head: bool = True):
        self.model, self.targets_M, self.chunk = model, targets_M, chunk_tokens
        #: the fast route needs the head's logits exactly (not under bf16 autocast)
        self.linear = head_is_linear(model) and exact_head
        head = model.get_output_embeddings()
        self.W_VD, self.b_V = head.weight, getattr(head, "bias", None)
        M = len(targets_M)
        self.ce_clean_M = torch.empty(M, dtype=torch.float64, device=hidden_MD.device)
        self.neg_entropy_M = torch.empty_like(self.ce_clean_M)
        if self.linear:
            self.p_bias_M = torch.zeros_like(self.ce_clean_M)
            self.pW_MD = torch.empty(M, self.W_VD.shape[1], dtype=torch.float32, device=hidden_MD.device)
        else:
            self.probs_MV = torch.empty(M, self.W_VD.shape[0], dtype=torch.float32, device=hidden_MD.device)
        for rows in self._chunks(M):
            log_probs = torch.log_softmax(lm_logits(model, hidden_MD[rows]), dim=-1)
            self.ce_clean_M[rows] = -log_probs.gather(-1, targets_M[rows, None]).squeeze(-1).double()
            probs = probabilities(log_probs)
            self.neg_entropy_M[rows] = (probs * log_probs).sum(-1).double()
            if self.linear:
                self.pW_MD[rows] = probs @ self.W_VD.float()
                if self.b_V is not None:
                    self.p_bias_M[rows] = (probs @ self.b_V.float()).double()
            else:
                self.probs_MV[rows] = probs

    def _chunks(self, M: int):
        return (slice(s, min(s + self.chunk, M)) for s in range(0, M, self.chunk))

    @torch.no_grad()
    def score(self, hidden_MD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE, KL(clean ‖ other)) per scored position, float64, from another forward's hidden states."""
        ce_M, kl_M = torch.empty_like(self.ce_clean_M), torch.empty_like(self.ce_clean_M)
        for rows in self._chunks(len(self.targets_M)):
            logits = lm_logits(self.model, hidden_MD[rows])
            targets = self.targets_M[rows, None]
            log_q = torch.log_softmax(logits, dim=-1)
            log_q_target = log_q.gather(-1, targets).squeeze(-1).double()
            ce_M[rows] = -log_q_target
            if self.linear:  # KL = −H(p) − (pᵀW)·h′ − p·b + lse(l′), lse(l′) = l′[t] − log p′[t]
                lse = logits.gather(-1, targets).squeeze(-1).double() - log_q_target
                expected_logit = (self.pW_MD[rows].double() * hidden_MD[rows].double()).sum(-1) + self.p_bias_M[rows]
                kl_M[rows] = self.neg_entropy_M[rows] - expected_logit + lse
            else:  # KL = Σ p log p − Σ p log p′, with the clean probabilities kept
                kl_M[rows] = self.neg_entropy_M[rows] - (self.probs_MV[rows] * log_q).sum(-1).double()
        return ce_M, kl_M.clamp_min(0.0)
