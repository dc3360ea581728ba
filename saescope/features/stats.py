"""Streaming, memory-bounded per-latent statistics, vectorised over all latents of one SAE.

Every collector sees one batch at a time and keeps a fixed-size state, so a feature pass over
millions of tokens needs no more memory than one batch plus ``O(d_sae)`` summaries.  Python
heaps per latent would be the textbook way; at 54 SAEs x 4,096 latents they are far too slow,
so each collector here is a handful of tensor operations per batch (they run on the SAE's
device, CPU or CUDA alike).

A batch is described by an :class:`Events` value: the dense activations ``acts_BTF`` (zero
where a position must not count, e.g. BOS) and the list of firing events ``(n, f, a)``
(flat token index, latent, activation > 0), computed once and shared by every collector.

Scales.  Histograms and quantile buckets need a range before the pass has seen the largest
activation.  Each latent keeps an exponent ``e`` with ``max activation <= 2**e`` (the smallest
such power of two).  When a larger activation arrives ``e`` grows, and because the new range is
the old one doubled (once or more) every old histogram bin maps exactly onto a new one and every
old octave bucket onto a new one: nothing is approximated, and nothing must be seen twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: exponent of latents that have not fired yet
NEVER = -10_000


@dataclass
class Events:
    """One batch of one SAE's activations.

    ``acts_BTF`` (B sequences, T positions, F latents) is zero wherever a position does not
    count; ``n_E``/``f_E``/``a_E`` list its non-zero entries (flat token index ``b*T + t``,
    latent, activation); ``token_N`` holds the batch's token ids, flattened.
    """

    acts_BTF: torch.Tensor
    n_E: torch.Tensor
    f_E: torch.Tensor
    a_E: torch.Tensor
    token_N: torch.Tensor

    @classmethod
    def from_acts(cls, acts_BTF: torch.Tensor, token_BT: torch.Tensor, keep_BT: torch.Tensor) -> Events:
        acts_BTF = acts_BTF * keep_BT.unsqueeze(-1).to(acts_BTF.dtype)
        acts_NF = acts_BTF.reshape(-1, acts_BTF.shape[-1])
        n_E, f_E = (acts_NF > 0).nonzero(as_tuple=True)
        return cls(acts_BTF, n_E, f_E, acts_NF[n_E, f_E], token_BT.reshape(-1))

    @property
    def n_latents(self) -> int:
        return self.acts_BTF.shape[-1]


def gather_windows(acts_BTF: torch.Tensor, n_K: torch.Tensor, f_K: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Activations of latent ``f_K[i]`` at positions ``t-before .. t+after`` around token
    ``n_K[i]`` (flat index), as float16 ``(K, before+1+after)``; zero outside the sequence."""
    T = acts_BTF.shape[1]
    b_K, t_K = n_K // T, n_K % T
    offsets_W = torch.arange(-before, after + 1, device=acts_BTF.device)
    pos_KW = t_K.unsqueeze(1) + offsets_W
    inside_KW = (pos_KW >= 0) & (pos_KW < T)
    vals_KW = acts_BTF[b_K.unsqueeze(1), pos_KW.clamp(0, T - 1), f_K.unsqueeze(1)] * inside_KW
    return vals_KW.clamp(-65504, 65504).half()


class LatentScale:
    """Per latent: firing count, activation sum and max, and the range exponent ``e``."""

    def __init__(self, n_latents: int, device: torch.device | str = "cpu"):
        self.count_F = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.sum_F = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.max_F = torch.zeros(n_latents, dtype=torch.float32, device=device)
        self.exp_F = torch.full((n_latents,), NEVER, dtype=torch.int64, device=device)

    def update(self, ev: Events) -> torch.Tensor:
        """Fold in a batch; returns the previous exponents (collectors rescale from them)."""
        old_exp_F = self.exp_F.clone()
        self.count_F += torch.bincount(ev.f_E, minlength=ev.n_latents)
        self.sum_F.index_add_(0, ev.f_E, ev.a_E.double())
        self.max_F.scatter_reduce_(0, ev.f_E, ev.a_E.float(), reduce="amax")
        fired_F = self.max_F > 0
        needed_F = torch.ceil(torch.log2(self.max_F.clamp_min(1e-30))).long()
        self.exp_F = torch.where(fired_F, torch.maximum(self.exp_F, needed_F), self.exp_F)
        return old_exp_F


def octave(a_E: torch.Tensor, exp_E: torch.Tensor) -> torch.Tensor:
    """0 for a in (2**(e-1), 2**e], 1 for the octave below, and so on."""
    return exp_E - torch.ceil(torch.log2(a_E.float().clamp_min(1e-30))).long()


class RunningHistogram:
    """Per-latent histogram of non-zero activations over ``n_bins`` equal bins of [0, 2**e]."""

    def __init__(self, n_latents: int, n_bins: int = 64, device: torch.device | str = "cpu"):
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 2, got {n_bins}")
        self.n_bins = n_bins
        self.counts_FH = torch.zeros(n_latents, n_bins, dtype=torch.int64, device=device)

    def update(self, ev: Events, old_exp_F: torch.Tensor, exp_F: torch.Tensor) -> None:
        grew_F = (exp_F - old_exp_F).where(old_exp_F != NEVER, torch.zeros_like(exp_F))
        half = self.n_bins // 2
        # Doubling the range merges neighbouring bins into the lower half; after log2(n_bins)
        # doublings everything sits in bin 0, so more rounds change nothing.
        for step in range(1, min(int(grew_F.max().item()), int(math.log2(self.n_bins))) + 1):
            rows = (grew_F >= step).nonzero(as_tuple=True)[0]
            merged = self.counts_FH[rows].view(-1, half, 2).sum(-1)
            self.counts_FH[rows] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
        top_E = torch.exp2(exp_F[ev.f_E].double())
        bin_E = (ev.a_E.double() / top_E * self.n_bins).long().clamp(0, self.n_bins - 1)
        flat = self.counts_FH.view(-1)
        flat.index_add_(0, ev.f_E * self.n_bins + bin_E, torch.ones_like(bin_E))


class RunningTopK:
    """Per latent, the ``k`` largest activations seen, their flat token ids and context windows.

    Each batch is reduced to its own top-k per latent (``topk`` over tokens), merged with the
    running top-k and cut back to k: exact, and O(F·k) memory.
    """

    def __init__(self, n_latents: int, k: int, before: int, after: int, device: torch.device | str = "cpu"):
        self.k, self.before, self.after = k, before, after
        self.value_FK = torch.zeros(n_latents, k, dtype=torch.float32, device=device)
        self.token_FK = torch.full((n_latents, k), -1, dtype=torch.int64, device=device)
        self.window_FKW = torch.zeros(n_latents, k, before + 1 + after, dtype=torch.float16, device=device)

    def update(self, ev: Events, token_offset: int) -> None:
        acts_NF = ev.acts_BTF.reshape(-1, ev.n_latents)
        kb = min(self.k, acts_NF.shape[0])
        batch_val_FK, batch_n_FK = (t.T for t in acts_NF.topk(kb, dim=0))
        cand_val = torch.cat([self.value_FK, batch_val_FK.float()], dim=1)
        self.value_FK, pick_FK = cand_val.topk(self.k, dim=1)
        from_batch_FK = pick_FK >= self.k
        batch_pick = (pick_FK - self.k).clamp_min(0)
        old_pick = pick_FK.clamp_max(self.k - 1)
        picked_n_FK = batch_n_FK.gather(1, batch_pick)
        self.token_FK = torch.where(from_batch_FK, picked_n_FK + token_offset, self.token_FK.gather(1, old_pick))
        self.window_FKW = self.window_FKW.gather(1, old_pick.unsqueeze(-1).expand_as(self.window_FKW))
        new_f, new_slot = (from_batch_FK & (self.value_FK > 0)).nonzero(as_tuple=True)
        self.window_FKW[new_f, new_slot] = gather_windows(
            ev.acts_BTF, picked_n_FK[new_f, new_slot], new_f, self.before, self.after
        )
        self.token_FK[self.value_FK <= 0] = -1


class OctaveSampler:
    """Per latent and activation octave, a uniform random sample of ``s`` firing events.

    Octave 0 holds activations in (2**(e-1), 2**e], octave j the one j steps below; the last
    octave also takes everything smaller.  Sampling is bottom-s by a random key per event (keep
    the s smallest keys): a uniform sample without replacement that merges exactly, which is
    what lets octaves fuse when a latent's range ``e`` grows.
    """

    def __init__(self, n_latents: int, n_octaves: int, s: int, before: int, after: int,
                 device: torch.device | str = "cpu", seed: int = 0):
        self.n_octaves, self.s, self.before, self.after = n_octaves, s, before, after
        slots = n_latents * n_octaves * s
        self.key_S = torch.full((slots,), math.inf, dtype=torch.float64, device=device)
        self.value_S = torch.zeros(slots, dtype=torch.float32, device=device)
        self.token_S = torch.full((slots,), -1, dtype=torch.int64, device=device)
        self.window_SW = torch.zeros(slots, before + 1 + after, dtype=torch.float16, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _group(self, f: torch.Tensor, a: torch.Tensor, exp_F: torch.Tensor) -> torch.Tensor:
        return f * self.n_octaves + octave(a, exp_F[f]).clamp(0, self.n_octaves - 1)

    def update(self, ev: Events, old_exp_F: torch.Tensor, exp_F: torch.Tensor, token_offset: int) -> None:
        s = self.s
        key_E = torch.rand(ev.a_E.shape[0], generator=self.generator, device=ev.a_E.device, dtype=torch.float64)
        group_E = self._group(ev.f_E, ev.a_E, exp_F)
        # Cheap pre-filter: an event can only enter if its key beats the s-th smallest key of its
        # group; groups of latents whose range just grew are re-formed, so no filter there.
        threshold_E = self.key_S[group_E * s + s - 1]
        threshold_E[exp_F[ev.f_E] != old_exp_F[ev.f_E]] = math.inf
        cand = (key_E < threshold_E).nonzero(as_tuple=True)[0]
        old = torch.isfinite(self.key_S).nonzero(as_tuple=True)[0]
        old_f = old // (self.n_octaves * s)
        group = torch.cat([self._group(old_f, self.value_S[old], exp_F), group_E[cand]])
        key = torch.cat([self.key_S[old], key_E[cand]])
        order = torch.argsort(group.double() + key)  # keys are in [0, 1): sorts by (group, key)
        group, key = group[order], key[order]
        rank = torch.arange(len(order), device=order.device) - torch.searchsorted(group, group)
        keep = rank < s
        order, group, key, slot = order[keep], group[keep], key[keep], group[keep] * s + rank[keep]
        is_old = order < len(old)
        src_old, src_new = old[order[is_old]], cand[order[~is_old] - len(old)]

        value = torch.empty_like(key, dtype=torch.float32)
        token = torch.empty_like(key, dtype=torch.int64)
        window = torch.empty(len(key), self.window_SW.shape[1], dtype=torch.float16, device=key.device)
        value[is_old], token[is_old], window[is_old] = self.value_S[src_old], self.token_S[src_old], self.window_SW[src_old]
        value[~is_old] = ev.a_E[src_new].float()
        token[~is_old] = ev.n_E[src_new] + token_offset
        window[~is_old] = gather_windows(ev.acts_BTF, ev.n_E[src_new], ev.f_E[src_new], self.before, self.after)

        self.key_S.fill_(math.inf)
        self.value_S.zero_()
        self.token_S.fill_(-1)
        self.key_S[slot], self.value_S[slot], self.token_S[slot], self.window_SW[slot] = key, value, token, window


class TokenIndex:
    """For each vocabulary token seen, the ``m`` latents with the largest activation on it.

    Answers "which latents fire on ' Paris'?".  Rows exist only for the token ids in ``vocab``
    (the corpus's distinct tokens), so memory is ``len(vocab) * m``, not ``vocab_size * m``.
    """

    def __init__(self, vocab: torch.Tensor, m: int, device: torch.device | str = "cpu"):
        self.vocab = torch.as_tensor(vocab, dtype=torch.int64, device=device).unique()
        self.m = m
        self.value_VM = torch.zeros(len(self.vocab), m, dtype=torch.float32, device=device)
        self.latent_VM = torch.full((len(self.vocab), m), -1, dtype=torch.int64, device=device)

    def update(self, ev: Events) -> None:
        m, F = self.m, ev.n_latents
        v_E = torch.searchsorted(self.vocab, ev.token_N[ev.n_E])
        v_E = v_E.clamp_max(len(self.vocab) - 1)
        known = self.vocab[v_E] == ev.token_N[ev.n_E]
        cand = known & (ev.a_E > self.value_VM[v_E, m - 1])
        v_C, f_C, a_C = v_E[cand], ev.f_E[cand], ev.a_E[cand].float()
        if len(v_C) == 0:
            return
        rows = v_C.unique()
        old_v, old_slot = (self.latent_VM[rows] >= 0).nonzero(as_tuple=True)
        old_v = rows[old_v]
        v = torch.cat([old_v, v_C])
        f = torch.cat([self.latent_VM[old_v, old_slot], f_C])
        a = torch.cat([self.value_VM[old_v, old_slot], a_C])
        pair, inverse = torch.unique(v * F + f, return_inverse=True)  # sorted by (v, f)
        best = torch.zeros(len(pair), dtype=a.dtype, device=a.device).scatter_reduce_(0, inverse, a, reduce="amax")
        v, f = pair // F, pair % F
        order = torch.argsort(best, descending=True, stable=True)
        order = order[torch.argsort(v[order], stable=True)]  # by token, then activation desc
        v, f, best = v[order], f[order], best[order]
        rank = torch.arange(len(v), device=v.device) - torch.searchsorted(v, v)
        keep = rank < m
        self.value_VM[rows] = 0
        self.latent_VM[rows] = -1
        self.value_VM[v[keep], rank[keep]] = best[keep]
        self.latent_VM[v[keep], rank[keep]] = f[keep]
