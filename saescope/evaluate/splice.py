"""Splice SAEs into a live model: replace a site's tensor by its reconstruction, read or edit latents.

Everything here goes through :func:`saescope.sites.hook_site`, so the tensor an SAE is spliced
into is exactly the tensor it was harvested from.  The evaluation suite uses the same
:class:`SpliceHook`.  A transcoder is spliced at its target: the MLP's output (``mlp_out``) is
replaced by the transcoder's prediction from the MLP's input of the same forward.

The BOS position.  By default the first position of every sequence keeps its clean activation
(``skip_bos=True``): with the tokenizers saescope uses it holds BOS, whose activations are huge
outliers (an attention sink) that training never sees (harvest drops BOS), and whose output
predicts nothing we score.  Splicing it would measure an input the SAE was never meant to
reconstruct.  ``skip_bos=False`` splices it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from saescope.sae.base import SAE
from saescope.sites import Site, capture, hook_site, io_sites

LatentEdit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SpliceRecord:
    """What one hooked forward saw at a site: input, latents, reconstruction (all (B, T, ·))."""

    x_BTD: torch.Tensor
    f_BTF: torch.Tensor
    x_hat_BTD: torch.Tensor


class SpliceHook:
    """A site hook ``x -> replacement`` built from an SAE (pass to ``hook_site``).

    * ``keep_error=False``: the site's tensor becomes x̂ = decode(encode(x)).
    * ``keep_error=True``: it becomes x̂ + (x − x̂) = x, unchanged, but the latents are computed
      (observable in ``last``) and, with ``edit``, editable: the output is then
      decode(edit(f)) + (x − decode(f)), so only the edited latents' contribution changes.
    * ``edit(f_BTF) -> f_BTF`` rewrites latents before decoding (ablation, clamping).
    * ``record=True`` keeps the last forward's :class:`SpliceRecord` in ``last``.

    Attach it with ``hook_site(..., with_input=True)`` (:func:`splice` does): it is called as
    ``hook(y, x)``, the site's tensor and the tensor the SAE reads — the same for an SAE; for a
    transcoder, ``mlp_out`` and ``mlp_in`` (the record's ``x_BTD`` is then the input, and its
    ``x_hat_BTD`` the prediction of y).  The SAE runs in its own dtype and device; the result is
    cast back to the site's.
    """

    #: attach with ``hook_site(..., with_input=True)``
    with_input = True

    def __init__(self, sae: SAE, *, keep_error: bool = False, skip_bos: bool = True,
                 edit: LatentEdit | None = None, record: bool = True):
        self.sae, self.keep_error, self.skip_bos = sae, keep_error, skip_bos
        self.edit, self.record = edit, record
        self.last: SpliceRecord | None = None

    @torch.no_grad()
    def __call__(self, y_BTD: torch.Tensor, x_BTD: torch.Tensor | None = None) -> torch.Tensor:
        param = self.sae.W_dec
        y = y_BTD.to(device=param.device, dtype=param.dtype)
        x = y if x_BTD is None else x_BTD.to(device=param.device, dtype=param.dtype)
        if x_BTD is None and self.sae.is_transcoder:
            raise ValueError("a transcoder's splice needs its input: attach it with hook_site(..., with_input=True)")
        with torch.autocast(x.device.type, enabled=False):  # the SAE in its own precision, always
            f = self.sae.encode(x)
            y_hat = self.sae.predict(x, f)
            if self.record:
                self.last = SpliceRecord(x, f, y_hat)
            out = self.sae.predict(x, self.edit(f)) if self.edit is not None else y_hat
            if self.keep_error:
                out = out + (y - y_hat)
        out = out.to(device=y_BTD.device, dtype=y_BTD.dtype)
        return keep_first_position(y_BTD, out) if self.skip_bos else out


def keep_first_position(x_BTD: torch.Tensor, out_BTD: torch.Tensor) -> torch.Tensor:
    """``out`` with position 0 taken from ``x`` (a new tensor: ``out`` may be recorded elsewhere)."""
    return torch.cat([x_BTD[:, :1], out_BTD[:, 1:]], dim=1)


@contextlib.contextmanager
def splice(model: nn.Module, saes: dict[Site, SAE], keep_error: bool = False, *, skip_bos: bool = True,
           edit: dict[Site, LatentEdit] | None = None) -> Iterator[dict[Site, SpliceHook]]:
    """Within the block, every forward of ``model`` runs with each SAE spliced into its site.

    Yields ``{site: SpliceHook}``; after a forward, ``hooks[site].last`` holds that site's
    input, latents and reconstruction.  See :class:`SpliceHook` for ``keep_error``, ``edit``
    and the module docstring for ``skip_bos``.  Hooks are removed on exit, even after an error.
    """
    edit = edit or {}
    unknown = set(edit) - set(saes)
    if unknown:
        raise ValueError(f"edit given for sites without an SAE: {', '.join(map(str, sorted(unknown)))}")
    hooks = {site: SpliceHook(sae, keep_error=keep_error, skip_bos=skip_bos, edit=edit.get(site))
             for site, sae in saes.items()}
    handles = []
    try:
        for site, hook in hooks.items():
            handles.append(hook_site(model, site, hook, with_input=True))
        yield hooks
    finally:
        for handle in handles:
            handle.remove()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_text(tokenizer, text: str, device) -> tuple[torch.Tensor, bool]:
    """Token ids ``(1, T)`` of ``text`` starting with BOS (added when the tokenizer does not),
    and whether position 0 is a BOS token."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (ids.shape[1] == 0 or ids[0, 0].item() != bos):
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
    return ids.to(device), bos is not None


@torch.no_grad()
def features_for_text(model: nn.Module, tokenizer, site: Site, sae: SAE, text: str) -> tuple[list[str], torch.Tensor]:
    """The SAE's latents on every token of ``text``: ``(tokens, f_TF)``.

    The text is run with a BOS in front (as in training); BOS itself is left out of the result,
    so ``tokens[i]`` is the i-th token of the text and ``f_TF[i]`` its latents.  The forward stops
    after the site's layer (no logits).
    """
    ids, has_bos = encode_text(tokenizer, text, _model_device(model))
    x_site = io_sites(site)[0]  # a transcoder reads its mlp_in
    x_BTD = capture(model, [x_site], ids)[x_site]
    param = sae.W_dec
    f_TF = sae.encode(x_BTD[0].to(device=param.device, dtype=param.dtype))
    start = 1 if has_bos else 0
    tokens = tokenizer.convert_ids_to_tokens(ids[0, start:].tolist())
    return tokens, f_TF[start:]


@contextlib.contextmanager
def ablate_latents(model: nn.Module, site: Site, sae: SAE, latents: Iterable[int], *,
                   skip_bos: bool = True) -> Iterator[SpliceHook]:
    """Within the block, ``latents`` are zeroed at ``site``, the SAE's error term kept.

    The site's tensor becomes x − Σᵢ fᵢ(x)·W_dec[i] over the ablated latents i: everything the SAE
    does not explain is untouched, so the change is the ablation alone.
    """
    index = torch.as_tensor(list(latents), dtype=torch.long)
    if index.numel() and (index.min() < 0 or index.max() >= sae.cfg.d_sae):
        raise ValueError(f"latent index out of range: the SAE has {sae.cfg.d_sae} latents")

    def zero(f_BTF: torch.Tensor) -> torch.Tensor:
        f_BTF = f_BTF.clone()
        f_BTF[..., index.to(f_BTF.device)] = 0
        return f_BTF

    with splice(model, {site: sae}, keep_error=True, skip_bos=skip_bos, edit={site: zero}) as hooks:
        yield hooks[site]


@contextlib.contextmanager
def steer(model: nn.Module, site: Site, sae: SAE, latent: int, coefficient: float, *,
          skip_bos: bool = True) -> Iterator[None]:
    """Within the block, ``coefficient × W_dec[latent]`` is added to the site at every position.

    The decoder row is the direction the latent writes into the site, so this pushes the model
    along the feature (the SAE's encoder is not run).
    """
    if not 0 <= latent < sae.cfg.d_sae:
        raise ValueError(f"latent {latent} out of range: the SAE has {sae.cfg.d_sae} latents")
    direction_D = sae.W_dec[latent].detach()

    def add(x_BTD: torch.Tensor) -> torch.Tensor:
        out = x_BTD + coefficient * direction_D.to(device=x_BTD.device, dtype=x_BTD.dtype)
        return keep_first_position(x_BTD, out) if skip_bos else out

    handle = hook_site(model, site, add)
    try:
        yield
    finally:
        handle.remove()
