"""Sites: the places in a transformer where saescope reads (and splices) activations.

Gemma Scope trains SAEs on three sites per layer (layers are 0-indexed):

``resid_post``
    the residual stream after the whole block (TransformerLens ``hook_resid_post``);
``attn_z``
    the attention heads' outputs concatenated, *before* the output projection
    (``attn.hook_z``; width ``n_heads * head_dim``, which is not ``d_model`` for Gemma);
``mlp_out``
    the MLP output after Gemma's post-feed-forward RMSNorm (``hook_mlp_out``), or the plain
    MLP output where the architecture has no such norm.

A site is named ``layer_<L>/<kind>``, e.g. ``layer_12/resid_post``.

Selection syntax (:func:`select_sites`) is a comma-separated list of terms, each one of

* ``all`` — every kind at every layer;
* a kind (``resid_post``, ``attn_z``, ``mlp_out``) — that kind at every layer;
* either of the above followed by ``@LAYERS``, where LAYERS is ``7``, ``0-5`` (inclusive) or
  ``0-17:2`` (inclusive, with a step), e.g. ``resid_post@0-5`` or ``all@12``;
* a full site name, ``layer_12/attn_z``.

Every site is read and written through one mechanism, :func:`hook_site`: a hook that gets the
site's tensor and may return a replacement.  Capture (harvest), splicing (evaluation), steering
and the feature browser all use it, so the tensor one of them sees is the tensor all of them see.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from saescope.settings import SITE_KINDS  # defined there so that parsing flags needs no torch

_SITE_NAME = re.compile(r"^layer_(\d+)/([a-z_]+)$")


@dataclass(frozen=True, order=True)
class Site:
    """One site: a layer index and a kind.  Hashable and ordered (layer first)."""

    layer: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; known kinds: {', '.join(SITE_KINDS)}")
        if self.layer < 0:
            raise ValueError(f"site layer must be >= 0, got {self.layer}")

    @property
    def name(self) -> str:
        return f"layer_{self.layer}/{self.kind}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> "Site":
        """Parse ``layer_<L>/<kind>``."""
        m = _SITE_NAME.match(name.strip())
        if not m:
            raise ValueError(f"bad site name {name!r}: expected 'layer_<L>/<kind>', e.g. 'layer_12/resid_post'")
        return cls(int(m.group(1)), m.group(2))


def _parse_layers(spec: str, n_layers: int) -> list[int]:
    m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", spec.strip())
    if not m:
        raise ValueError(f"bad layer range {spec!r}: use '7', '0-5' or '0-17:2'")
    start = int(m.group(1))
    stop = int(m.group(2)) if m.group(2) is not None else start
    step = int(m.group(3)) if m.group(3) is not None else 1
    if step < 1 or stop < start:
        raise ValueError(f"bad layer range {spec!r}")
    if stop >= n_layers:
        raise ValueError(f"layer {stop} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return list(range(start, stop + 1, step))


def select_sites(spec: str | Iterable[str], n_layers: int) -> list[Site]:
    """Turn a selection (see module docstring) into a sorted, de-duplicated list of sites."""
    terms = spec.split(",") if isinstance(spec, str) else list(spec)
    sites: set[Site] = set()
    for term in (t.strip() for t in terms):
        if not term:
            continue
        if term.startswith("layer_"):
            site = Site.parse(term)
            if site.layer >= n_layers:
                raise ValueError(f"site {term!r} out of range: the model has {n_layers} layers")
            sites.add(site)
            continue
        kind, _, layers = term.partition("@")
        kinds = SITE_KINDS if kind == "all" else (kind,)
        if kind != "all" and kind not in SITE_KINDS:
            raise ValueError(
                f"unknown site selection {term!r}: use 'all', one of {', '.join(SITE_KINDS)}, "
                "optionally '@LAYERS', or a name like 'layer_12/resid_post'"
            )
        layer_list = _parse_layers(layers, n_layers) if layers else list(range(n_layers))
        sites.update(Site(layer, k) for layer in layer_list for k in kinds)
    if not sites:
        raise ValueError(f"site selection {spec!r} selects no site")
    return sorted(sites)


# --------------------------------------------------------------------------------------------
# Architecture adapters: where each site lives in a Hugging Face model.


@dataclass(frozen=True)
class ArchAdapter:
    """Where the sites live in one family of Hugging Face architectures.

    ``attn_in`` returns the module whose *input* is ``attn_z`` (the output projection);
    ``mlp_out`` returns the module whose *output* is ``mlp_out``.  ``resid_post`` is always the
    output of the decoder block itself.
    """

    family: str
    model_types: tuple[str, ...]
    blocks: Callable[[nn.Module], nn.ModuleList]
    attn_in: Callable[[nn.Module], nn.Module]
    mlp_out: Callable[[nn.Module], nn.Module]
    final_norm: Callable[[nn.Module], nn.Module]


ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter(
        family="gemma2/gemma3",
        model_types=("gemma2", "gemma3", "gemma3_text"),
        blocks=lambda m: _base(m).layers,
        attn_in=lambda b: b.self_attn.o_proj,
        mlp_out=lambda b: b.post_feedforward_layernorm,
        final_norm=lambda m: _base(m).norm,
    ),
    ArchAdapter(
        family="llama-style (llama, mistral, qwen2, qwen3, gemma)",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"),
        blocks=lambda m: _base(m).layers,
        attn_in=lambda b: b.self_attn.o_proj,
        mlp_out=lambda b: b.mlp,
        final_norm=lambda m: _base(m).norm,
    ),
    ArchAdapter(
        family="gpt2",
        model_types=("gpt2",),
        blocks=lambda m: _base(m).h,
        attn_in=lambda b: b.attn.c_proj,
        mlp_out=lambda b: b.mlp,
        final_norm=lambda m: _base(m).ln_f,
    ),
    ArchAdapter(
        family="gpt_neox",
        model_types=("gpt_neox",),
        blocks=lambda m: _base(m).layers,
        attn_in=lambda b: b.attention.dense,
        mlp_out=lambda b: b.mlp,
        final_norm=lambda m: _base(m).final_layer_norm,
    ),
)


def _base(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.model``, ``model.transformer``, ``model.gpt_neox``)."""
    prefix = getattr(model, "base_model_prefix", "")
    for name in (prefix, "model", "transformer", "gpt_neox"):
        if name and hasattr(model, name):
            return getattr(model, name)
    return model


def adapter_for(model: nn.Module) -> ArchAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise ValueError(f"architecture {model_type!r} is not supported; supported model types: {supported}")


def n_layers(model: nn.Module) -> int:
    return len(adapter_for(model).blocks(model))


def site_width(model: nn.Module, site: Site) -> int:
    """The width (d_in of an SAE) of a site, read from the module shapes."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    if site.layer >= len(blocks):
        raise ValueError(f"site {site} out of range: the model has {len(blocks)} layers")
    if site.kind == "attn_z":
        proj = adapter.attn_in(blocks[site.layer])
        if isinstance(proj, nn.Linear):
            return proj.in_features
        return int(proj.nx)  # transformers' Conv1D (GPT-2) stores weight as (nx, nf)
    return int(model.config.hidden_size)


def check_sae_fits(model: nn.Module, site: Site, sae: nn.Module, name: str) -> None:
    """Refuse an SAE whose d_in is not its site's width, naming the SAE, the site and both sizes
    (torch would say only ``mat1 and mat2 shapes cannot be multiplied``, mid-forward)."""
    width = site_width(model, site)
    d_in = int(sae.W_enc.shape[0])
    if d_in != width:
        raise ValueError(f"SAE {name} has d_in {d_in}, but site {site.name} of this model is {width} wide: "
                         "is it an SAE of another model (pass --model) or another site kind (--kind)?")


# --------------------------------------------------------------------------------------------
# Hooks: one mechanism to read or replace a site's tensor.

SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def hook_site(model: nn.Module, site: Site, fn: SiteFn) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(x_BTD)`` with the site's tensor on every forward; a returned tensor replaces it.

    Returns the hook handle (``handle.remove()`` detaches it).
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    if site.layer >= len(blocks):
        raise ValueError(f"site {site} out of range: the model has {len(blocks)} layers")
    block = blocks[site.layer]

    if site.kind == "attn_z":

        def pre_hook(module, args, kwargs):
            new = fn(args[0])
            if new is None:
                return None
            return (new, *args[1:]), kwargs

        return adapter.attn_in(block).register_forward_pre_hook(pre_hook, with_kwargs=True)

    module = block if site.kind == "resid_post" else adapter.mlp_out(block)

    def out_hook(module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        new = fn(tensor)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(out_hook)


@contextlib.contextmanager
def hooked(model: nn.Module, fns: dict[Site, SiteFn]) -> Iterator[None]:
    """Context manager: attach ``fns`` (site -> hook function), detach on exit."""
    handles = [hook_site(model, site, fn) for site, fn in fns.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once every wanted site is captured."""


def stop_after_layer(model: nn.Module, layer: int) -> torch.utils.hooks.RemovableHandle:
    """Abort the forward after block ``layer``: later blocks, the final norm and the
    vocabulary logits (Gemma's 262k-row unembedding costs more than the rest of a 270M model)
    are never computed.  Use with :func:`run_to_layer`."""

    def hook(module, args, output):
        raise _StopForward

    return adapter_for(model).blocks(model)[layer].register_forward_hook(hook)


def run_to_layer(model: nn.Module, layer: int, **inputs) -> None:
    """Run the model's forward on ``inputs`` and stop after block ``layer``."""
    handle = stop_after_layer(model, layer)
    try:
        model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()


@torch.no_grad()
def capture(
    model: nn.Module,
    sites: Iterable[Site],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[Site, torch.Tensor]:
    """One forward pass that returns every requested site's tensor, ``(batch, seq, width)``.

    The forward stops after the deepest layer needed, so no logits are computed.
    """
    sites = sorted(set(sites))
    out: dict[Site, torch.Tensor] = {}

    def keep(site: Site) -> SiteFn:
        def fn(x: torch.Tensor) -> None:
            out[site] = x.detach()

        return fn

    inputs = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    with hooked(model, {s: keep(s) for s in sites}):
        run_to_layer(model, max(s.layer for s in sites), **inputs)
    return out
