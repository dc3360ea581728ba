"""Release folders in Gemma Scope's layout: write ours, read ours and Gemma Scope's.

A release folder ``<root>/<site kind>/layer_<L>/width_<W>/average_l0_<K>/`` holds

* ``params.npz`` — ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc`` (d_sae),
  ``b_dec`` (d_in) and, for JumpReLU / BatchTopK, ``threshold`` (d_sae); float32, in raw
  activation units (no b_dec subtracted before the encoder) — the arrays Gemma Scope released;
* ``params.safetensors`` — the same arrays, for tools that prefer safetensors;
* ``config.json`` — d_in, d_sae, architecture, k and whatever the trainer records (model, site,
  λ, tokens seen, C, recipe, and ``sae_config``: the full :class:`SAEConfig`);
* ``metrics.json`` — optional.

:func:`load_sae` reads such a folder, or one of Gemma Scope's (``params.npz`` only, the config
inferred from the path as SAELens does), with ``np.load(..., allow_pickle=False)``, and checks
every key, shape, dtype and value before building the SAE.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saescope.sae.base import SAE, SAEConfig
from saescope.sites import SITE_KINDS, Site

PARAMS_NPZ = "params.npz"
PARAMS_SAFETENSORS = "params.safetensors"
CONFIG_JSON = "config.json"
METRICS_JSON = "metrics.json"

#: arrays each architecture releases (Gemma Scope's names)
RELEASED_ARRAYS = {
    "jumprelu": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"),
    "batchtopk": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"),
    "topk": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "relu": ("W_enc", "W_dec", "b_enc", "b_dec"),
}
_ACCEPTED_DTYPES = ("float32", "float16", "bfloat16")
# Gemma Scope repositories: google/gemma-scope-2b-pt-res, -mlp, -att (HF cache: models--google--…)
_GEMMA_SCOPE_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)(?![a-z])")
_GEMMA_SCOPE_KIND = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}
_RELEASE_TAIL = re.compile(r"(?:^|/)layer_(\d+)/width_([0-9]+[km]?)/average_l0_(\d+)$")


# --- names ----------------------------------------------------------------------------------


def width_label(d_sae: int) -> str:
    """Gemma Scope's width names: 16384 → '16k', 65536 → '65k', 2**20 → '1m', 4096 → '4k'
    (decimal thousands, rounded down); widths that are not a multiple of 1024 stay numbers."""
    if d_sae % 1024:
        return str(d_sae)
    if d_sae >= 2**20:
        return f"{d_sae // 10**6}m"
    return f"{d_sae // 1000}k"


def release_folder(root: str | Path, site: Site | str, d_sae: int, average_l0: float) -> Path:
    """``<root>/<site.kind>/layer_<L>/width_<W>/average_l0_<K>``, K the rounded average L0."""
    site = Site.parse(site) if isinstance(site, str) else site
    return Path(root) / site.kind / f"layer_{site.layer}" / f"width_{width_label(d_sae)}" / f"average_l0_{round(average_l0)}"


# --- writing --------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_sae(sae: SAE, folder: str | Path, *, config: dict[str, Any], metrics: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` (already in release form: ``sae.fold_input_scale(C)`` done) to ``folder``.

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
    own = {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "architecture": sae.architecture, "k": sae.cfg.k}
    for key, value in own.items():
        if config.get(key, value) != value:
            raise ValueError(f"config[{key!r}] = {config[key]!r} contradicts the SAE's {key} = {value!r}")
    full_config = {**own, **config}
    full_config.setdefault("sae_config", sae.cfg.to_dict())

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with open(tmp / PARAMS_NPZ, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        save_file(arrays, str(tmp / PARAMS_SAFETENSORS))
        _write_json(tmp / CONFIG_JSON, full_config)
        if metrics is not None:
            _write_json(tmp / METRICS_JSON, metrics)
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


def export_safetensors(path: str | Path, out: str | Path) -> Path:
    """Write a release (ours or Gemma Scope's; folder or file) as one safetensors file."""
    from safetensors.numpy import save_file

    sae = load_sae(path)
    out = Path(out)
    save_file({n: np.ascontiguousarray(t.numpy()) for n, t in sae.to_arrays().items()}, str(out))
    return out


# --- reading --------------------------------------------------------------------------------


def _read_arrays(file: Path) -> dict[str, np.ndarray]:
    """Every array in a params file, as float32 numpy arrays, after checking their dtypes."""
    raw: dict[str, Any] = {}
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        for name, t in tensors.items():
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in _ACCEPTED_DTYPES:
                raise ValueError(f"{file}: array {name!r} has dtype {dtype}; expected one of {', '.join(_ACCEPTED_DTYPES)}")
            raw[name] = t.float().numpy()
        return raw
    with open(file, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # without a zip signature np.load would try to unpickle
            raise ValueError(f"{file}: not a readable .npz archive (no zip signature)")
    try:
        data = np.load(file, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{file}: not a readable .npz archive ({e})") from None
    with data:
        for name in data.files:
            try:
                a = data[name]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise ValueError(f"{file}: array {name!r} is a pickled object array, which is refused") from None
                raise ValueError(f"{file}: array {name!r} cannot be read ({e})") from None
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise ValueError(f"{file}: array {name!r} cannot be read ({e})") from None
            if a.dtype.name not in _ACCEPTED_DTYPES:
                raise ValueError(f"{file}: array {name!r} has dtype {a.dtype}; expected one of {', '.join(_ACCEPTED_DTYPES)}")
            raw[name] = a.astype(np.float32)
    return raw


def _standard_names(file: Path, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SAELens's conventions: lowercase ``w_enc``/``w_dec`` keys; an optional per-latent
    ``scaling_factor`` (all ones is dropped; otherwise folded into the decoder rows, which is
    exact: (f·s)·W_dec = f·(s·W_dec))."""
    arrays = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    if len(arrays) != len(raw):
        raise ValueError(f"{file}: holds both lowercase and uppercase copies of a weight ({', '.join(sorted(raw))})")
    scale = arrays.pop("scaling_factor", None)
    if scale is not None and "W_dec" in arrays and not np.allclose(scale, 1.0):
        if scale.ndim not in (0, 1) or (scale.ndim == 1 and scale.shape[0] != arrays["W_dec"].shape[0]):
            raise ValueError(f"{file}: scaling_factor has shape {scale.shape}; expected () or ({arrays['W_dec'].shape[0]},)")
        arrays["W_dec"] = arrays["W_dec"] * np.reshape(scale, (-1, 1))
    return arrays


def _check_arrays(file: Path, arrays: dict[str, np.ndarray], architecture: str) -> tuple[int, int]:
    names = RELEASED_ARRAYS[architecture]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ValueError(f"{file}: missing array(s) {', '.join(missing)} (a {architecture} SAE needs {', '.join(names)})")
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise ValueError(f"{file}: unexpected array(s) {', '.join(extra)} for a {architecture} SAE")
    if arrays["W_enc"].ndim != 2:
        raise ValueError(f"{file}: W_enc must be 2-D (d_in, d_sae), got shape {arrays['W_enc'].shape}")
    d_in, d_sae = arrays["W_enc"].shape
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name in names:
        if arrays[name].shape != expected[name]:
            raise ValueError(
                f"{file}: {name} has shape {arrays[name].shape}, but W_enc {(d_in, d_sae)} implies {expected[name]}"
            )
        if not np.isfinite(arrays[name]).all():
            raise ValueError(f"{file}: {name} contains NaN or Inf")
    return d_in, d_sae


def _infer_config(folder: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """A config for a folder without config.json (Gemma Scope's releases), from its path."""
    posix = folder.resolve().as_posix()
    tail = _RELEASE_TAIL.search(posix)
    repo = _GEMMA_SCOPE_REPO.search(posix)
    if "threshold" not in arrays and not (tail or repo):
        raise ValueError(
            f"{folder}: no {CONFIG_JSON} and no threshold array, so the architecture cannot be told; "
            f"only JumpReLU releases (Gemma Scope's) can be loaded without a config"
        )
    config: dict[str, Any] = {"architecture": "jumprelu", "source": "inferred from the path"}
    if tail:
        config.update(layer=int(tail.group(1)), width=tail.group(2), average_l0=int(tail.group(3)))
    kind = None
    if repo:
        size, variant, short = repo.groups()
        config["model"] = f"gemma-2-{size}" + ("-it" if variant == "it" else "")
        kind = _GEMMA_SCOPE_KIND[short]
    elif tail and folder.parent.parent.parent.name in SITE_KINDS:  # our layout, config.json lost
        kind = folder.parent.parent.parent.name
    if kind is not None and tail:
        config["site"] = Site(int(tail.group(1)), kind).name
    return config


def _params_file(path: Path) -> Path:
    if path.is_dir():
        for name in (PARAMS_NPZ, PARAMS_SAFETENSORS):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no {PARAMS_NPZ} or {PARAMS_SAFETENSORS} in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SAE folder or params file")
    if path.suffix not in (".npz", ".safetensors"):
        raise ValueError(f"{path}: expected a release folder, a .npz or a .safetensors file")
    return path


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):  # a malformed file, reported like every other (cli prints ValueError)
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
    return obj


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load a release folder (ours or Gemma Scope's), or its params file, as an SAE in release
    form.  The returned SAE also carries ``release_config`` (config.json, or what the path told),
    ``release_metrics`` (metrics.json or None) and ``release_path``."""
    from saescope.sae.registry import ARCHITECTURES, build_sae

    file = _params_file(Path(path))
    folder = file.parent
    arrays = _standard_names(file, _read_arrays(file))
    config = _read_json(folder / CONFIG_JSON)
    if config is None:
        config = _infer_config(folder, arrays)
    architecture = config.get("architecture")
    if architecture not in RELEASED_ARRAYS or architecture not in ARCHITECTURES:
        raise ValueError(f"{folder / CONFIG_JSON}: unknown architecture {architecture!r}")
    d_in, d_sae = _check_arrays(file, arrays, architecture)
    for key, actual in (("d_in", d_in), ("d_sae", d_sae)):
        if config.get(key, actual) != actual:
            raise ValueError(f"{folder}: config says {key} = {config[key]}, but the arrays have {key} = {actual}")
    if "width" in config and config["width"] != width_label(d_sae):
        raise ValueError(f"{folder}: the path says width_{config['width']}, but the arrays have d_sae = {d_sae}")

    cfg = SAEConfig.from_dict(config["sae_config"]) if isinstance(config.get("sae_config"), dict) else SAEConfig(d_in, d_sae)
    cfg.d_in, cfg.d_sae, cfg.architecture, cfg.centre_input = d_in, d_sae, architecture, False
    if config.get("k") is not None:
        cfg.k = int(config["k"])
    with torch.random.fork_rng(devices=[]):  # initialisation is overwritten; keep the caller's RNG
        sae = build_sae(cfg)
    sae.load_arrays({name: torch.from_numpy(a) for name, a in arrays.items()})
    sae.release_config = config
    sae.release_metrics = _read_json(folder / METRICS_JSON)
    sae.release_path = folder
    return sae.to(device)
