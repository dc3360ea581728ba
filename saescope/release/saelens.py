"""SAELens's on-disk format, both ways.

:func:`saelens_config` is the ``cfg.json`` of an export (written by
:func:`saescope.release.export.export_saelens`: per SAE, ``cfg.json`` and
``sae_weights.safetensors`` that SAELens 6.x's ``SAE.load_from_disk(folder)`` loads);
:func:`read_saelens` reads such a folder (``saescope.load_sae`` dispatches to it).  The format, as SAELens 6.54's ``save_model`` writes it:

* weights ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc``, ``b_dec`` (+ ``threshold``
  for JumpReLU) — Gemma Scope's names and orientation, float32; transcoders (SAELens's
  ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``) have ``W_dec`` (d_sae, d_out), ``d_out``
  in cfg.json and ``W_skip`` stored (d_out, d_in), the transpose of ours;
* ``cfg.json``: ``architecture`` (``jumprelu``, ``topk`` with ``k``, ``standard``), ``d_in``,
  ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input`` (subtract b_dec before the encoder:
  False for released saescope and Gemma Scope SAEs), ``normalize_activations`` ("none": our
  input maps are folded into the weights), ``reshape_activations`` ("hook_z" for attention
  outputs: TransformerLens's ``hook_z`` is (…, heads, d_head), flattened in head order — the
  order of the o_proj input saescope's ``attn_z`` site reads), and ``metadata`` (free-form:
  ``model_name``, ``hook_name``, ``context_size``, … and saescope's own provenance).

Sites map to TransformerLens hook names: ``blocks.L.hook_resid_post``, ``blocks.L.hook_mlp_out``
(after Gemma's post-MLP norm, as TransformerLens places it), ``blocks.L.attn.hook_z``.
BatchTopK SAEs are exported as JumpReLU, their inference code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from saescope.sae.base import SAE, SAEConfig
from saescope.sites import Site

CFG_JSON = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
#: the SAELens version whose format this writes (and the version tested against)
SAELENS_FORMAT_VERSION = "6.54.12"
#: saescope architecture -> SAELens architecture
TO_SAELENS = {"jumprelu": "jumprelu", "batchtopk": "jumprelu", "topk": "topk", "relu": "standard",
              "jumprelu_transcoder": "jumprelu_transcoder", "jumprelu_skip_transcoder": "jumprelu_skip_transcoder",
              "batchtopk_transcoder": "jumprelu_transcoder", "batchtopk_skip_transcoder": "jumprelu_skip_transcoder"}
FROM_SAELENS = {"jumprelu": "jumprelu", "topk": "topk", "standard": "relu",
                "jumprelu_transcoder": "jumprelu_transcoder", "jumprelu_skip_transcoder": "jumprelu_skip_transcoder"}
#: a transcoder's hooks, as SAELens's own Gemma Scope 2 loader names them (``hook_mlp_in`` is
#: TransformerLens's name for the MLP's input; the Hugging Face module paths say exactly which tensor)
_TRANSCODER_HOOKS = ("blocks.{layer}.hook_mlp_in", "blocks.{layer}.hook_mlp_out")
_HOOKS = {"resid_post": "blocks.{layer}.hook_resid_post", "mlp_out": "blocks.{layer}.hook_mlp_out",
          "attn_z": "blocks.{layer}.attn.hook_z"}
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_mlp_out|attn\.hook_z|hook_mlp_in)$")
_KIND_OF_HOOK = {"hook_resid_post": "resid_post", "hook_mlp_out": "mlp_out", "attn.hook_z": "attn_z",
                 "hook_mlp_in": "transcoder"}


def hook_name(site: Site) -> str:
    """TransformerLens's name for ``site`` (the hook SAELens splices at)."""
    if site.kind == "transcoder":
        return _TRANSCODER_HOOKS[0].format(layer=site.layer)
    if site.kind not in _HOOKS:
        raise ValueError(f"site {site}: SAELens has no hook for kind {site.kind!r}")
    return _HOOKS[site.kind].format(layer=site.layer)


def site_of_hook(name: str) -> Site:
    match = _HOOK_RE.match(name or "")
    if not match:
        raise ValueError(f"SAELens hook {name!r} is not a site saescope knows "
                         f"(blocks.L.hook_resid_post, blocks.L.hook_mlp_out, blocks.L.attn.hook_z)")
    return Site(int(match.group(1)), _KIND_OF_HOOK[match.group(2)])


def is_saelens_folder(path: Path) -> bool:
    return path.is_dir() and (path / CFG_JSON).is_file() and (path / WEIGHTS).is_file()


def saelens_config(sae: SAE, site: Site, config: dict[str, Any]) -> dict[str, Any]:
    """The ``cfg.json`` SAELens 6.x reads, for a release-form ``sae`` at ``site``."""
    architecture = TO_SAELENS.get(sae.architecture)
    if architecture is None:
        raise ValueError(f"SAELens has no architecture for saescope's {sae.architecture!r}")
    provenance = {k: v for k, v in config.items() if k not in ("recipe", "sae_config", "input_map")}
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(sae.cfg.centre_input),
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if site.kind == "attn_z" else "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": config.get("model"),
            "hook_name": hook_name(site),
            "hook_head_index": None,
            "context_size": config.get("seq_len"),
            "prepend_bos": True,
            "dataset_path": config.get("corpus"),
            "neuronpedia_id": None,
            "saescope": provenance,
        },
    }
    if architecture == "topk":
        cfg.update(k=int(sae.cfg.k), rescale_acts_by_decoder_norm=False)
    if sae.is_transcoder:
        from saescope.release.gemma_scope_2 import hook_points

        points = hook_points(site)
        cfg["d_out"] = int(sae.cfg.d_out)
        cfg["metadata"].update(hook_name_out=_TRANSCODER_HOOKS[1].format(layer=site.layer),
                               hf_hook_name=points["hf_hook_point_in"], hf_hook_name_out=points["hf_hook_point_out"])
    return cfg


def saelens_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """The weights SAELens reads: saescope's arrays, with ``W_skip`` as SAELens's (d_out, d_in)
    (saescope and Gemma Scope 2 store it (d_in, d_out); SAELens adds ``x @ W_skip.T``)."""
    tensors = {name: t.contiguous() for name, t in sae.to_arrays().items()}
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    return tensors


def read_saelens(folder: Path, device: str | torch.device = "cpu") -> tuple[SAE, dict[str, Any]]:
    """A SAELens folder as a release-form saescope SAE, and a saescope-style config (with its site).

    ``apply_b_dec_to_input`` is folded into b_enc (π = (x − b_dec)·W_enc + b_enc = x·W_enc +
    (b_enc − b_dec·W_enc)), exactly; activation normalisation other than "none" is refused (it
    needs a dataset-dependent factor the folder does not hold)."""
    from safetensors.torch import load_file

    from saescope.jsonio import read_json
    from saescope.sae.registry import build_sae

    cfg = read_json(folder / CFG_JSON)
    if not isinstance(cfg, dict):
        raise ValueError(f"{folder / CFG_JSON}: not a SAELens config")
    architecture = FROM_SAELENS.get(cfg.get("architecture"))
    if architecture is None:
        raise ValueError(f"{folder / CFG_JSON}: SAELens architecture {cfg.get('architecture')!r} has no saescope "
                         f"equivalent ({', '.join(FROM_SAELENS)} load)")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{folder / CFG_JSON}: normalize_activations={cfg['normalize_activations']!r} needs a "
                         "scaling factor saescope cannot fold; re-save it from SAELens with the factor folded")
    try:
        weights = load_file(str(folder / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{folder / WEIGHTS}: cannot read it ({err})") from None
    transcoder = architecture.endswith("transcoder")
    skip = architecture.endswith("skip_transcoder")
    needed = (("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if architecture.startswith("jumprelu") else ())
              + (("W_skip",) if skip else ()))
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ValueError(f"{folder / WEIGHTS}: missing {', '.join(missing)}")
    W_enc = weights["W_enc"].float()
    d_in, d_sae = W_enc.shape
    d_out = int(weights["W_dec"].shape[-1]) if transcoder else d_in
    if weights["W_dec"].shape != (d_sae, d_out):
        raise ValueError(f"{folder / WEIGHTS}: W_dec has shape {tuple(weights['W_dec'].shape)}, expected {(d_sae, d_out)}")
    if skip and weights["W_skip"].shape != (d_out, d_in):
        raise ValueError(f"{folder / WEIGHTS}: W_skip has shape {tuple(weights['W_skip'].shape)}, expected {(d_out, d_in)}")
    b_enc = weights["b_enc"].float()
    if cfg.get("apply_b_dec_to_input", not transcoder):
        b_enc = b_enc - weights["b_dec"].float() @ W_enc
    k = cfg.get("k") if architecture == "topk" else None
    with torch.random.fork_rng(devices=[]):
        sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, centre_input=False,
                                  **({"k": int(k)} if k is not None else {}), **({"d_out": d_out} if transcoder else {})))
    arrays = {"W_enc": W_enc, "W_dec": weights["W_dec"].float(), "b_enc": b_enc, "b_dec": weights["b_dec"].float()}
    if "threshold" in needed:
        arrays["threshold"] = weights["threshold"].float()
    if skip:
        arrays["W_skip"] = weights["W_skip"].float().T.contiguous()
    sae.load_arrays(arrays)
    metadata = cfg.get("metadata") or {}
    config: dict[str, Any] = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "k": k,
                              "model": metadata.get("model_name"), "source": "saelens", "saelens_cfg": cfg}
    hook = metadata.get("hook_name", cfg.get("hook_name"))
    if hook:
        config["site"] = site_of_hook(hook).name
    return sae.to(device), config
