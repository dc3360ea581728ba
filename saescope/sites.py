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

Two more kinds serve transcoders (Gemma Scope 2), which read the MLP's input and predict its
output:

``mlp_in``
    the MLP module's input: the output of the pre-MLP norm (Gemma 2/3's
    ``pre_feedforward_layernorm``, Llama's ``post_attention_layernorm``, GPT-2's ``ln_2``);
``transcoder``
    a *pair* site (:data:`PAIR_KINDS`): it reads ``mlp_in`` and predicts ``mlp_out`` of the same
    layer (:func:`io_sites`).  It is stored and streamed as those two ordinary sites
    (:func:`data_sites`), captured in the same forward, rows aligned.  As a hook site its tensor
    is its target, ``mlp_out`` (what a transcoder's output replaces); ``hook_site(...,
    with_input=True)`` also hands the hook the ``mlp_in`` of the same forward.

A site is named ``layer_<L>/<kind>``, e.g. ``layer_12/resid_post``.

Selection syntax (:func:`select_sites`) is a comma-separated list of terms, each one of

* ``all`` — the three SAE kinds (``resid_post``, ``attn_z``, ``mlp_out``) at every layer;
* a kind (``resid_post``, ``attn_z``, ``mlp_out``, ``mlp_in``, ``transcoder``) — that kind at
  every layer;
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

from saescope.settings import KNOWN_KINDS, PAIR_KINDS, SITE_KINDS, layer_list  # defined there: parsing flags needs no torch

_SITE_NAME = re.compile(r"^layer_(\d+)/([a-z_]+)$")


@dataclass(frozen=True, order=True)
class Site:
    """One site: a layer index and a kind.  Hashable and ordered (layer first)."""

    layer: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KNOWN_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; known kinds: {', '.join(KNOWN_KINDS)}")
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
        if kind != "all" and kind not in KNOWN_KINDS:
            raise ValueError(
                f"unknown site selection {term!r}: use 'all', one of {', '.join(KNOWN_KINDS)}, "
                "optionally '@LAYERS', or a name like 'layer_12/resid_post'"
            )
        chosen = layer_list(layers, n_layers) if layers else list(range(n_layers))
        sites.update(Site(layer, k) for layer in chosen for k in kinds)
    if not sites:
        raise ValueError(f"site selection {spec!r} selects no site")
    return sorted(sites)


def io_sites(site: Site) -> tuple[Site, Site]:
    """``(the site read, the site predicted)``: a transcoder's ``mlp_in`` and ``mlp_out``; for
    every other site, the site twice."""
    pair = PAIR_KINDS.get(site.kind)
    return (Site(site.layer, pair[0]), Site(site.layer, pair[1])) if pair else (site, site)


def data_sites(sites: Iterable[Site]) -> list[Site]:
    """The ordinary sites whose activations ``sites`` need (a pair site: both of its halves),
    sorted and de-duplicated: what a store holds and a source yields."""
    return sorted({s for site in sites for s in io_sites(site)})


# --------------------------------------------------------------------------------------------
# Architecture adapters: where each site lives in a Hugging Face model.


@dataclass(frozen=True)
class ArchAdapter:
    """Where the sites live in one family of Hugging Face architectures.

    ``attn_in`` returns the module whose *input* is ``attn_z`` (the output projection);
    ``mlp_out`` returns the module whose *output* is ``mlp_out``; ``mlp_in`` the module whose
    *input* is ``mlp_in`` (the MLP itself, in every family).  ``resid_post`` is always the
    output of the decoder block itself.
    """

    family: str
    model_types: tuple[str, ...]
    blocks: Callable[[nn.Module], nn.ModuleList]
    attn_in: Callable[[nn.Module], nn.Module]
    mlp_out: Callable[[nn.Module], nn.Module]
    final_norm: Callable[[nn.Module], nn.Module]
    mlp_in: Callable[[nn.Module], nn.Module] = lambda b: b.mlp


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
    """Refuse an SAE whose d_in is not its site's width (a transcoder: whose d_in or d_out is not
    the width of the site it reads or predicts), or a transcoder at an SAE site and the reverse,
    naming the SAE, the site and the sizes (torch would say only ``mat1 and mat2 shapes cannot
    be multiplied``, mid-forward)."""
    transcoder = bool(getattr(sae, "is_transcoder", False))
    if transcoder != (site.kind in PAIR_KINDS):
        what = "a transcoder" if transcoder else "an SAE, not a transcoder"
        raise ValueError(f"{name} is {what}, but its site is {site.name}: "
                         f"{'transcoders belong at transcoder sites' if transcoder else 'pass another --kind'}")
    x_site, y_site = io_sites(site)
    d_in, d_out = int(sae.W_enc.shape[0]), int(sae.W_dec.shape[1])
    width_in, width_out = site_width(model, x_site), site_width(model, y_site)
    if transcoder and (d_in, d_out) != (width_in, width_out):
        raise ValueError(f"transcoder {name} maps d_in {d_in} to d_out {d_out}, but site {site.name} of this model "
                         f"reads {width_in} and predicts {width_out} dimensions: is it a transcoder of another "
                         "model (pass --model)?")
    if d_in != width_in:
        raise ValueError(f"SAE {name} has d_in {d_in}, but site {site.name} of this model is {width_in} wide: "
                         "is it an SAE of another model (pass --model) or another site kind (--kind)?")


# --------------------------------------------------------------------------------------------
# Hooks: one mechanism to read or replace a site's tensor.

SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def hook_site(model: nn.Module, site: Site, fn, *, with_input: bool = False):
    """Call ``fn(x_BTD)`` with the site's tensor on every forward; a returned tensor replaces it.

    A pair site's tensor is its target (a transcoder's: ``mlp_out``).  ``with_input=True``:
    ``fn(y_BTD, x_BTD)`` gets the target and the tensor the site reads, from the same forward
    (a transcoder: ``mlp_out`` and ``mlp_in``; any other site: its tensor twice).
    Returns the hook handle (``handle.remove()`` detaches it).
    """
    x_site, y_site = io_sites(site)
    if with_input and x_site != y_site:
        seen: dict[str, torch.Tensor] = {}
        first = hook_site(model, x_site, lambda x: seen.__setitem__("x", x))  # returns None: no change
        try:
            return _Handles(first, hook_site(model, y_site, lambda y: fn(y, seen.pop("x"))))
        except BaseException:
            first.remove()
            raise
    if with_input:
        return hook_site(model, site, lambda x: fn(x, x))
    site = y_site
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    if site.layer >= len(blocks):
        raise ValueError(f"site {site} out of range: the model has {len(blocks)} layers")
    block = blocks[site.layer]

    if site.kind in ("attn_z", "mlp_in"):
        target = adapter.attn_in(block) if site.kind == "attn_z" else adapter.mlp_in(block)

        def pre_hook(module, args, kwargs):
            new = fn(args[0])
            if new is None:
                return None
            return (new, *args[1:]), kwargs

        return target.register_forward_pre_hook(pre_hook, with_kwargs=True)

    module = block if site.kind == "resid_post" else adapter.mlp_out(block)

    def out_hook(module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        new = fn(tensor)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(out_hook)


@contextlib.contextmanager
def hooked(model: nn.Module, fns: dict[Site, SiteFn], *, with_input: bool = False) -> Iterator[None]:
    """Context manager: attach ``fns`` (site -> hook function; see :func:`hook_site` for
    ``with_input``), detach on exit."""
    handles = []
    try:
        for site, fn in fns.items():
            handles.append(hook_site(model, site, fn, with_input=with_input))
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

    The forward stops after the deepest layer needed, so no logits are computed.  Pair sites
    are refused: capture their halves (:func:`data_sites`).
    """
    sites = sorted(set(sites))
    pairs = [s.name for s in sites if s.kind in PAIR_KINDS]
    if pairs:
        raise ValueError(f"capture the sites {', '.join(pairs)} read and predict instead: {', '.join(map(str, data_sites(sites)))}")
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
