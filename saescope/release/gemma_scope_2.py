"""Gemma Scope 2's release layout, read and written.

Gemma Scope 2 (``google/gemma-scope-2-{size}-{pt|it}``) names one folder per SAE::

    {site}/layer_{L}_width_{16k|65k|262k|1m}_l0_{small|medium|big}[_affine]/
        params.safetensors   w_enc (d_in, d_sae), w_dec (d_sae, d_out), b_enc, b_dec, threshold,
                             affine_skip_connection (d_in, d_out) for skip transcoders
        config.json          architecture "jump_relu", model_name, hf_hook_point_in[, _out],
                             width, l0, affine_connection

with ``{site}`` one of ``resid_post``, ``attn_out`` (the o_proj *input*: our ``attn_z``),
``mlp_out``, ``transcoder`` (``_all`` variants hold every layer).  The weights act on raw
activations, no b_dec is subtracted before the encoder: saescope's release form.  Facts read from
SAELens 6.54's ``gemma_3`` loader (``sae_lens/loading/pretrained_sae_loaders.py``), which infers
the config from the folder name when config.json is absent; so does :func:`infer_config`.

The L0 labels are bands, not numbers (the paper: small 10–20, medium 30–60, big 90–150);
:func:`l0_label` puts an L0 into the nearest band.  Our own layout (``<kind>/layer_L/width_W/
average_l0_K``) stays the default; ``--layout gemma-scope-2`` writes this one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from saescope.release.layout import GS2_FOLDER as FOLDER
from saescope.release.layout import GS2_KINDS as KIND_OF_FOLDER
from saescope.release.layout import width_label
from saescope.sites import Site

LAYOUT = "gemma-scope-2"
FOLDER_OF_KIND = {kind: folder for folder, kind in KIND_OF_FOLDER.items()}
#: the band edges between the paper's labels: small 10–20 | medium 30–60 | big 90–150
L0_BANDS = ((25.0, "small"), (75.0, "medium"), (float("inf"), "big"))
#: Hugging Face module paths (Gemma 2/3 naming) of each site's tensor: (in, out)
_HOOK_POINTS = {
    "resid_post": ("model.layers.{L}.output", None),
    "attn_z": ("model.layers.{L}.self_attn.o_proj.input", None),
    "mlp_out": ("model.layers.{L}.post_feedforward_layernorm.output", None),
    "transcoder": ("model.layers.{L}.pre_feedforward_layernorm.output",
                   "model.layers.{L}.post_feedforward_layernorm.output"),
}
_HOOK_RE = re.compile(r"^model\.layers\.(\d+)\.(output|self_attn\.o_proj\.input|post_feedforward_layernorm\.output"
                      r"|pre_feedforward_layernorm\.output)$")
_KIND_OF_HOOK = {"output": "resid_post", "self_attn.o_proj.input": "attn_z",
                 "post_feedforward_layernorm.output": "mlp_out", "pre_feedforward_layernorm.output": "transcoder"}
#: saescope architecture of a GS2 folder: (is a transcoder, has the skip path) → name
_ARCHITECTURE = {(False, False): "jumprelu", (True, False): "jumprelu_transcoder", (True, True): "jumprelu_skip_transcoder"}
#: GS2's key for the skip matrix (ours: W_skip, the same (d_in, d_out) orientation)
SKIP_KEY = "affine_skip_connection"
#: our array names → GS2's keys (the reader's inverse is :func:`saescope.release.arrays.standard_names`)
ARRAY_NAMES = {"W_enc": "w_enc", "W_dec": "w_dec", "W_skip": SKIP_KEY}


def l0_label(l0: float) -> str:
    """The paper's band for an L0: ``small`` (< 25), ``medium`` (< 75) or ``big``."""
    if not l0 >= 0:
        raise ValueError(f"an L0 must be a number >= 0, got {l0!r}")
    return next(label for edge, label in L0_BANDS if l0 < edge)


def folder_path(root: str | Path, site: Site, d_sae: int, l0: float, *, affine: bool = False) -> Path:
    """``<root>/<site folder>/layer_<L>_width_<W>_l0_<label>[_affine]``."""
    if site.kind not in FOLDER_OF_KIND:
        raise ValueError(f"site {site}: Gemma Scope 2's layout has no folder for kind {site.kind!r} "
                         f"(it has {', '.join(FOLDER_OF_KIND)})")
    name = f"layer_{site.layer}_width_{width_label(d_sae)}_l0_{l0_label(l0)}" + ("_affine" if affine else "")
    return Path(root) / FOLDER_OF_KIND[site.kind] / name


def hook_points(site: Site) -> dict[str, str]:
    """``hf_hook_point_in`` (and ``hf_hook_point_out`` for transcoders) of a site, Gemma naming."""
    hook_in, hook_out = _HOOK_POINTS[site.kind]
    points = {"hf_hook_point_in": hook_in.format(L=site.layer)}
    if hook_out is not None:
        points["hf_hook_point_out"] = hook_out.format(L=site.layer)
    return points


def site_of_hooks(hook_in: str, hook_out: str | None = None) -> Site:
    match = _HOOK_RE.match(hook_in or "")
    if not match:
        raise ValueError(f"Gemma Scope 2 hook point {hook_in!r} is not a site saescope knows "
                         "(model.layers.L.output, …self_attn.o_proj.input, …post_feedforward_layernorm.output, "
                         "…pre_feedforward_layernorm.output)")
    kind = _KIND_OF_HOOK[match.group(2)]
    if kind == "transcoder" and hook_out is not None and not hook_out.endswith("post_feedforward_layernorm.output"):
        raise ValueError(f"a transcoder reading {hook_in!r} must write model.layers.L.post_feedforward_layernorm.output, "
                         f"not {hook_out!r}")
    return Site(int(match.group(1)), kind)


def writer_config(site: Site, d_sae: int, l0: float, *, model_name: str | None, affine: bool,
                  target_l0: float | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The small config.json a GS2 folder holds; ``extra`` (our provenance) goes under ``saescope``."""
    config: dict[str, Any] = {
        "architecture": "jump_relu",
        "model_name": model_name,
        **hook_points(site),
        "width": width_label(d_sae),
        "l0": round(float(l0), 2),
        "l0_label": l0_label(target_l0 if target_l0 is not None else l0),
    }
    if site.kind == "transcoder":
        config["affine_connection"] = bool(affine)
    if target_l0 is not None:
        config["target_l0"] = float(target_l0)
    if extra:
        config["saescope"] = extra
    return config


def is_gs2_config(config: dict | None) -> bool:
    """A config.json in GS2's form (``architecture: jump_relu`` and a hook point)."""
    return bool(config) and config.get("architecture") == "jump_relu" and "hf_hook_point_in" in config


def match_folder(folder: Path) -> re.Match | None:
    return FOLDER.search(folder.resolve().as_posix())


def _model_name(name: str | None) -> str | None:
    """GS2's model names (``gemma-v3-270m-pt``) as the Hugging Face ids they stand for (SAELens's rule)."""
    if not name or "gemma-v3" not in name:
        return name
    name = name.replace("gemma-v3", "gemma-3")
    name = name if name.startswith("google/") else f"google/{name}"
    return name.replace("-pt", "") if "270m" in name else name  # the 270M base model has no -pt suffix


def read_config(folder: Path, config: dict | None, arrays: dict) -> dict[str, Any]:
    """Our config dict (architecture, site, model, …) for a GS2 folder, from its config.json when
    it has one in GS2's form, else from its path (as SAELens does)."""
    match = match_folder(folder)
    if is_gs2_config(config):
        site = site_of_hooks(config["hf_hook_point_in"], config.get("hf_hook_point_out"))
        affine = bool(config.get("affine_connection", False))
        source = "gemma-scope-2 config.json"
        raw = dict(config)
    elif match:
        kind = KIND_OF_FOLDER[match.group(1)]
        site = Site(int(match.group(3)), kind)
        affine = match.group(6) is not None
        source = "inferred from the Gemma Scope 2 path"
        raw = {}
    else:
        raise ValueError(f"{folder}: neither a Gemma Scope 2 config.json nor a Gemma Scope 2 folder name "
                         "({site}/layer_L_width_W_l0_LABEL[_affine])")
    if (SKIP_KEY in arrays or "W_skip" in arrays) != affine and site.kind == "transcoder":
        have = "has" if (SKIP_KEY in arrays or "W_skip" in arrays) else "lacks"
        raise ValueError(f"{folder}: says affine_connection={affine}, but its params {have} {SKIP_KEY}")
    if site.kind != "transcoder" and (SKIP_KEY in arrays or "W_skip" in arrays):
        raise ValueError(f"{folder}: a {site.kind} SAE with an {SKIP_KEY} array (only transcoders have one)")
    out: dict[str, Any] = {
        "architecture": _ARCHITECTURE[(site.kind == "transcoder", affine)],
        "site": site.name,
        "layout": LAYOUT,
        "source": source,
    }
    model = _model_name(raw.get("model_name"))
    if model:
        out["model"] = model
    if match:
        out["width"] = match.group(4)
        out["l0_label"] = match.group(5)
    for key in ("l0", "target_l0", "hf_hook_point_in", "hf_hook_point_out"):
        if key in raw:
            out[key] = raw[key]
    ours = raw.get("saescope")
    if isinstance(ours, dict):  # a folder we wrote: our provenance back (never the architecture: it is GS2's)
        out.update({k: v for k, v in ours.items() if k not in out or k == "model"})
    return out
