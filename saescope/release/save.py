"""Writing release folders: one SAE (:func:`save_sae`), and the release step after training
(:func:`release_trained`), which names each folder by the L0 measured at the end of training and
records the trainer's figures as the ``training`` section of its ``metrics.json``.

A folder holds ``params.npz`` — ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc``
(d_sae), ``b_dec`` (d_in) and, for JumpReLU / BatchTopK, ``threshold`` (d_sae) — a transcoder's
``W_dec`` is (d_sae, d_out), its ``b_dec`` (d_out), a skip transcoder adds ``W_skip`` (d_in,
d_out); float32, in raw
activation units (no b_dec subtracted before the encoder), the arrays Gemma Scope released —
``params.safetensors`` (the same arrays), ``config.json`` (d_in, d_sae, architecture, k and what
the trainer records: model, site, λ, tokens seen, C, recipe and the full ``sae_config``) and
``metrics.json`` (:mod:`saescope.release.metrics`).
"""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from saescope.jsonio import write_json
from saescope.locks import folder_lock
from saescope.release.layout import (
    CHECKSUMS,
    CONFIG_JSON,
    PARAMS_NPZ,
    PARAMS_SAFETENSORS,
    release_folder,
    remove_stale,
    unique_folder,
)
from saescope.release import gemma_scope_2
from saescope.release.metrics import write_section
from saescope.sae.base import SAE
from saescope.sae.input_norm import InputNorm
from saescope.sites import Site


def save_sae(sae: SAE, folder: str | Path, *, config: dict[str, Any], metrics: dict[str, Any] | None = None,
             layout: str = "saescope") -> Path:
    """Write ``sae`` (already in release form: ``sae.fold_input_scale(C)`` done) to ``folder``;
    ``metrics`` become the ``training`` section of its ``metrics.json``.

    ``layout="gemma-scope-2"`` writes Gemma Scope 2's files instead: ``params.safetensors`` with
    lowercase keys and its small config.json (``config`` then needs ``site`` and ``average_l0``,
    and is kept under the config's ``saescope`` key).

    The folder appears complete or not at all: everything is written to a temporary sibling
    that is then renamed into place (an existing folder of that name is replaced)."""
    from safetensors.numpy import save_file

    if sae.cfg.centre_input:
        raise ValueError(
            "save_sae needs an SAE in release form (raw activations, no b_dec subtracted): "
            "call sae.fold_input_scale(C) first"
        )
    arrays = {name: np.ascontiguousarray(t.numpy(), dtype=np.float32) for name, t in sae.to_arrays().items()}
    bad = [name for name, a in arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise ValueError(f"refusing to release an SAE with non-finite values in {', '.join(bad)}")
    own = {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "architecture": sae.architecture, "k": getattr(sae.cfg, "k", None),
           **({"d_out": sae.cfg.d_out} if sae.is_transcoder else {})}
    for key, value in own.items():
        if config.get(key, value) != value:
            raise ValueError(f"config[{key!r}] = {config[key]!r} contradicts the SAE's {key} = {value!r}")
    full_config = {**own, **config}
    full_config.setdefault("sae_config", sae.cfg.to_dict())
    files = (PARAMS_NPZ, PARAMS_SAFETENSORS, CONFIG_JSON)
    if layout == gemma_scope_2.LAYOUT:
        arrays = {gemma_scope_2.ARRAY_NAMES.get(name, name): a for name, a in arrays.items()}
        full_config = gemma_scope_2.writer_config(
            Site.parse(full_config["site"]), sae.cfg.d_sae, full_config["average_l0"],
            model_name=full_config.get("model"), affine=gemma_scope_2.SKIP_KEY in arrays,
            target_l0=full_config.get("target_l0"), extra=full_config)
        files = (PARAMS_SAFETENSORS, CONFIG_JSON)
    elif layout != "saescope":
        raise ValueError(f"unknown release layout {layout!r}; use saescope or {gemma_scope_2.LAYOUT}")

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if PARAMS_NPZ in files:
            with open(tmp / PARAMS_NPZ, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
        save_file(arrays, str(tmp / PARAMS_SAFETENSORS))
        write_json(tmp / CONFIG_JSON, full_config)
        if metrics is not None:
            write_section(tmp, "training", metrics)
        write_checksums(tmp, files)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_checksums(folder: Path, names) -> Path:
    """``folder/SHA256SUMS`` in ``sha256sum``'s format (``sha256sum -c SHA256SUMS`` checks it)."""
    from saescope.activations.store import sha256_file, write_atomic

    lines = "".join(f"{sha256_file(folder / name)}  {name}\n" for name in names)
    path = folder / CHECKSUMS
    write_atomic(path, lines.encode())
    return path


def export_safetensors(path: str | Path, out: str | Path) -> Path:
    """Write a release (ours or Gemma Scope's; folder or file) as one safetensors file."""
    from safetensors.numpy import save_file

    from saescope.release.load import load_sae

    sae = load_sae(path)
    out = Path(out)
    save_file({n: np.ascontiguousarray(t.numpy()) for n, t in sae.to_arrays().items()}, str(out))
    return out


def release_trained(results, root: str | Path, *, model_name: str | None, recipe: dict[str, Any],
                    batch_size: int, write_folders: bool = True, layout: str = "saescope") -> tuple[list[Path], list[dict]]:
    """Release what a trainer returned (:class:`saescope.train.trainer.TrainedSAE`, in spec order).

    Each SAE that finished is copied, C is folded in, and it is saved under ``root`` in Gemma
    Scope's layout, named by its final average L0 (``layout="gemma-scope-2"``: Gemma Scope 2's,
    labelled by the target L0 where there is one).  Returns the folders written and one summary
    entry per SAE (released with its folder and metrics, or stopped with its error).
    ``write_folders=False``: the summary entries only (status ``trained``; benchmarks, tests).
    Holds the release's lock while writing (first removing what a killed release left behind).
    """
    root = Path(root)
    if not write_folders:
        return _release_trained(results, root, model_name, recipe, batch_size, write_folders, layout)
    with folder_lock(root, "release"):
        remove_stale(root)
        return _release_trained(results, root, model_name, recipe, batch_size, write_folders, layout)


def _release_trained(results, root: Path, model_name, recipe, batch_size: int, write_folders: bool, layout: str):
    from saescope.errors import warn
    from saescope.train.l0_check import l0_warnings, target_miss

    used: set[Path] = set()
    folders, summary = [], []
    finished = [r for r in results if r.error is None]
    all_metrics = {r.spec.name: _training_metrics(r, batch_size) for r in finished}
    warnings = l0_warnings(
        {"name": r.spec.name, "group": (r.spec.site.name, r.spec.d_sae, r.spec.architecture),
         "l0": all_metrics[r.spec.name]["average_l0"], "target_l0": r.spec.target_l0,
         "sparsity_coefficient": r.spec.sparsity_coefficient,
         "l0_after_warmup": r.metrics.get("l0_after_warmup"),
         "warmup_end": (r.metrics.get("l0_after_warmup_steps") or [None])[0]}
        for r in finished if r.spec.sparsity_coefficient is not None)
    for r in results:
        spec = r.spec
        entry = {"sae": spec.name, "site": spec.site.name, "spec": spec.to_dict()}
        if r.error is not None:
            summary.append({**entry, "status": "stopped", "error": r.error})
            continue
        metrics = all_metrics[spec.name]
        l0 = metrics["average_l0"]
        target_l0 = spec.target_l0
        if target_l0 is not None:
            metrics["target_l0"] = target_l0
            metrics["l0_vs_target"] = target_miss(l0, target_l0)
        if spec.name in warnings:
            metrics["l0_warnings"] = warnings[spec.name]
            for text in warnings[spec.name]:
                warn(f"{spec.name}: {text}")
        if not write_folders:
            summary.append({**entry, "status": "trained", "metrics": metrics})
            continue
        sae = copy.deepcopy(r.sae).to("cpu").eval()
        norm = r.norm if r.norm is not None else InputNorm.from_scale(r.scale, sae.cfg.d_in)
        if sae.is_transcoder:  # input and target maps, both folded
            sae.fold_io_norms(norm, r.target_norm)
        else:
            sae.fold_input_norm(norm)
        if hasattr(sae, "to_jumprelu"):  # BatchTopK, Matryoshka: the inference code is a JumpReLU
            sae = sae.to_jumprelu()
        if layout == gemma_scope_2.LAYOUT:
            named = gemma_scope_2.folder_path(root, spec.site, spec.d_sae, target_l0 if target_l0 is not None else l0,
                                              affine="W_skip" in sae.array_names)
        else:
            named = release_folder(root, spec.site, spec.d_sae, round(l0))
        folder = unique_folder(named, used)
        trained_as = {"architecture": spec.architecture, "k": spec.k,
                      **({"prefixes": list(spec.prefixes)} if spec.prefixes else {})}
        config = {
            "model": model_name,
            "site": spec.site.name,
            "d_in": sae.cfg.d_in,
            "d_sae": spec.d_sae,
            "architecture": sae.architecture,
            # BatchTopK / Matryoshka released as a JumpReLU (the same latents): what it was trained as
            **({"trained_as": trained_as} if spec.architecture != sae.architecture else {}),
            "sparsity_coefficient": spec.sparsity_coefficient,
            **({"target_l0": target_l0} if target_l0 is not None else {}),
            # the nested widths below d_sae: saescope eval reports each prefix's metrics
            **({"matryoshka_prefixes": list(spec.prefixes)} if spec.prefixes else {}),
            **({"average_l0": l0} if layout == gemma_scope_2.LAYOUT else {}),
            "k": getattr(sae.cfg, "k", None),
            "seed": spec.seed,
            "tokens_seen": r.tokens_seen,
            "input_scale": r.scale if r.norm is None or r.norm.mode == "scalar" else None,
            "input_norm": r.norm.mode if r.norm is not None else "scalar",
            **(_transcoder_config(spec.site, sae, r.target_norm) if sae.is_transcoder else {}),
            "recipe": recipe,
            "sae_config": sae.cfg.to_dict(),
        }
        written = save_sae(sae, folder, config=config, metrics=metrics, layout=layout)
        folders.append(written)
        summary.append({**entry, "status": "released", "folder": str(written), "metrics": metrics})
    return folders, summary


def _training_metrics(r, batch_size: int) -> dict:
    final = r.metrics
    # the L0 of the released weights (on the last batch), not the training average
    l0 = r.released_l0 if r.released_l0 is not None else final["l0"]
    return {
        "average_l0": l0,
        "l0_measured_on": (f"the last training batch ({batch_size} tokens), final weights"
                           if r.released_l0 is not None else "the training batches below"),
        "training_l0": final["l0"],
        **({"l0_after_warmup": final["l0_after_warmup"]} if "l0_after_warmup" in final else {}),
        "fvu": final["fvu"],
        "mse": final["mse_raw"],  # raw activation units
        "mse_normalized": final["mse"],
        "dead_fraction": final["dead_fraction"],
        "measured_on": f"the last {int(final['steps_averaged'])} training batches of {batch_size} tokens",
    }


def _transcoder_config(site, sae: SAE, target_norm: InputNorm) -> dict[str, Any]:
    """What a transcoder's config.json adds: its output width, the sites it reads and predicts
    (saescope's hook points) and its target's scale."""
    from saescope.sites import io_sites

    x_site, y_site = io_sites(site)
    return {"d_out": sae.cfg.d_out, "input_site": x_site.name, "target_site": y_site.name,
            "skip_connection": bool(sae.skip),
            "target_scale": target_norm.scalar if target_norm.mode == "scalar" else None}
