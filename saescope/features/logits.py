"""Direct logit effect: which tokens a latent's decoder direction promotes or suppresses.

A latent that fires adds ``a * W_dec[f]`` to its site.  Following that vector straight to the
logits, skipping every later block, gives the latent's *direct* effect on the next-token
distribution (the "logit lens" view of a decoder row, as Neuronpedia shows it):

1. ``attn_z`` sites live before the attention output projection: the row goes through
   ``o_proj`` (no bias: a bias does not depend on the latent), and, in Gemma 2/3, through the
   post-attention RMSNorm's gain (the "sandwich" norm applied to the attention output before it
   joins the residual stream).  ``resid_post`` and ``mlp_out`` rows are already residual-stream
   vectors (Gemma's ``mlp_out`` site is read after its post-feed-forward norm).
2. The final norm.  An RMSNorm divides the whole residual by its RMS and multiplies by a gain;
   the division is a positive per-token scalar that cannot change *which* tokens a direction
   favours, so we apply only the gain.  Its form differs by family: Gemma scales by ``1 + w``,
   Llama/Qwen/Mistral by ``w``.  Rather than branch on class names we read the gain off the
   module itself: an RMSNorm maps a vector of ones (RMS 1) to its gain.  A LayerNorm (GPT-2,
   GPT-NeoX) also centres its input, a linear step we apply before its weight; its bias, like
   any bias, is the same for every latent and is left out.
3. The unembedding (``lm_head``): ``logit_effect_FV = direction_FD @ W_U_VD.T``.

Approximations, stated plainly: the norms' scalar normalisation is dropped (values are in
"gain-weighted residual units", comparable across tokens of one latent, not calibrated logits
changes), and Gemma's final logit soft-capping (monotonic) is ignored.
"""

from __future__ import annotations

import torch
from torch import nn

from saescope.precision import bf16_runs_natively
from saescope.sites import Site, adapter_for


def _norm_gain(norm: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    """The elementwise gain of an RMSNorm-style module: its output on a vector of ones."""
    ones = torch.ones(1, width, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        return norm(ones).reshape(width).to(like.dtype)


def _apply_norm(norm: nn.Module, x_FD: torch.Tensor) -> torch.Tensor:
    """A norm's linear treatment of a direction (see module docstring)."""
    if isinstance(norm, nn.LayerNorm):
        x_FD = x_FD - x_FD.mean(dim=-1, keepdim=True)
        return x_FD * norm.weight.to(x_FD) if norm.weight is not None else x_FD
    return x_FD * _norm_gain(norm, x_FD.shape[-1], x_FD)


def residual_directions(model: nn.Module, site: Site, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """Map decoder rows at ``site`` to the residual-stream vectors they add."""
    if site.kind != "attn_z":
        return W_dec_FD
    adapter = adapter_for(model)
    block = adapter.blocks(model)[site.layer]
    proj = adapter.attn_in(block)
    if isinstance(proj, nn.Linear):
        out_FD = W_dec_FD @ proj.weight.to(W_dec_FD).T
    else:  # transformers' Conv1D (GPT-2): y = x @ weight, weight (nx, nf)
        out_FD = W_dec_FD @ proj.weight.to(W_dec_FD)
    if hasattr(block, "pre_feedforward_layernorm") and hasattr(block, "post_attention_layernorm"):
        # Gemma 2/3 sandwich norms: post_attention_layernorm normalises the attention output.
        # (In Llama the same name is the *pre*-MLP norm, hence the pre_feedforward test.)
        out_FD = _apply_norm(block.post_attention_layernorm, out_FD)
    return out_FD


def _rescore(dirs_CD: torch.Tensor, W_U_VD: torch.Tensor, cand_CK: torch.Tensor, n: int, largest: bool):
    """Exact float32 effects of the shortlisted tokens, and the best ``n`` of them."""
    exact_CK = torch.einsum("cd,ckd->ck", dirs_CD, W_U_VD[cand_CK].float())
    best = exact_CK.topk(n, dim=1, largest=largest)
    return cand_CK.gather(1, best.indices), best.values


def blocked_topk(x_CV: torch.Tensor, k: int, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``k`` largest and of the ``k`` smallest entries per row, unordered: the
    same sets as ``topk``, found faster on wide rows.  The top k entries lie in the k blocks
    with the largest maxima, so one pass of per-block max and min narrows each search to k * block."""
    C, V = x_CV.shape
    if V <= 4 * k * block:
        return x_CV.topk(k, dim=1).indices, x_CV.topk(k, dim=1, largest=False).indices
    out = []
    blocks = []
    for fill in (float("-inf"), float("inf")):
        padded = torch.nn.functional.pad(x_CV, (0, block - V % block), value=fill) if V % block else x_CV
        blocks.append(padded.view(C, -1, block))
    if V % block:
        lo_CN, hi_CN = blocks[1].amin(-1), blocks[0].amax(-1)
    else:
        lo_CN, hi_CN = torch.aminmax(blocks[0], dim=-1)
    for blocks_CNB, extreme_CN, largest in ((blocks[0], hi_CN, True), (blocks[1], lo_CN, False)):
        pick_CK = extreme_CN.topk(k, dim=1, largest=largest).indices
        inside_CKB = blocks_CNB.gather(1, pick_CK.unsqueeze(-1).expand(-1, -1, block))
        sel_CK = inside_CKB.reshape(C, -1).topk(k, dim=1, largest=largest).indices
        ids_CKB = pick_CK.unsqueeze(-1) * block + torch.arange(block, device=x_CV.device)
        out.append(ids_CKB.reshape(C, -1).gather(1, sel_CK))
    return out[0], out[1]


class LogitLens:
    """The unembedding side of the direct logit effect, prepared once per model.

    ``shortlist_dtype`` (e.g. bfloat16, several times faster than float32 on CPUs with bf16
    units): the whole vocabulary is ranked in that dtype, 8 x ``n_tokens`` candidates per side
    are kept and re-scored in float32.  Values are exact; a token is missed only if bf16
    rounding (~0.4%) moves it past 70 others.
    """

    def __init__(self, model: nn.Module, shortlist_dtype: torch.dtype | None = None, chunk: int = 256):
        self.model, self.chunk, self.shortlisting = model, chunk, shortlist_dtype is not None
        self.W_U_VD = model.get_output_embeddings().weight
        self.fast_W_U_DV = self.W_U_VD.to(shortlist_dtype or torch.float32).T
        self.final_norm = adapter_for(model).final_norm(model)

    @torch.no_grad()
    def effects(self, site: Site, W_dec_FD: torch.Tensor, n_tokens: int = 10):
        """``(top_ids_FK, top_values_FK, bottom_ids_FK, bottom_values_FK)`` on CPU, bottom sorted
        most-negative first.  Latents go ``chunk`` at a time, so the (F, vocab) matrix (4,096 x
        262,144 floats for Gemma would be 4 GiB) never exists whole."""
        W_dec_FD = W_dec_FD.to(device=self.W_U_VD.device, dtype=torch.float32)
        n_cand = min(8 * n_tokens, self.W_U_VD.shape[0]) if self.shortlisting else n_tokens
        out = ([], [], [], [])
        for start in range(0, W_dec_FD.shape[0], self.chunk):
            dirs_CD = residual_directions(self.model, site, W_dec_FD[start : start + self.chunk])
            dirs_CD = _apply_norm(self.final_norm, dirs_CD)
            effect_CV = dirs_CD.to(self.fast_W_U_DV.dtype) @ self.fast_W_U_DV
            top, bottom = blocked_topk(effect_CV, n_cand)
            del effect_CV
            results = (*_rescore(dirs_CD, self.W_U_VD, top, n_tokens, True),
                       *_rescore(dirs_CD, self.W_U_VD, bottom, n_tokens, False))
            for acc, t in zip(out, results):
                acc.append(t.cpu())
        return tuple(torch.cat(acc) for acc in out)


def logit_effects(
    model: nn.Module, site: Site, W_dec_FD: torch.Tensor, n_tokens: int = 10, chunk: int = 256,
    shortlist_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top and bottom ``n_tokens`` of each latent's direct logit effect (see :class:`LogitLens`)."""
    return LogitLens(model, shortlist_dtype, chunk).effects(site, W_dec_FD, n_tokens)


def fast_shortlist_dtype(device: torch.device | str) -> torch.dtype | None:
    """bfloat16 on CPUs with bf16 matrix units (there it multiplies several times faster than
    float32; :mod:`saescope.precision`), else None (plain float32; on CUDA float32 is fast enough)."""
    if torch.device(device).type != "cpu":
        return None
    return torch.bfloat16 if bf16_runs_natively(device) else None
