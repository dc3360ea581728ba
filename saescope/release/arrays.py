"""Reading a release's params file (ours or Gemma Scope's) safely: ``np.load(...,
allow_pickle=False)`` or safetensors, and every key, shape, dtype and value checked before an
SAE is built from it."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from saescope.release.layout import PARAMS_NPZ, PARAMS_SAFETENSORS

#: arrays each architecture releases (Gemma Scope's names)
RELEASED_ARRAYS = {
    "jumprelu": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"),
    "batchtopk": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"),
    "topk": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "relu": ("W_enc", "W_dec", "b_enc", "b_dec"),
    # transcoders: W_dec (d_sae, d_out), b_dec (d_out), W_skip (d_in, d_out)
    "jumprelu_transcoder": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"),
    "jumprelu_skip_transcoder": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold", "W_skip"),
}
#: architectures whose output is another site's (W_dec's width is d_out, not d_in)
TRANSCODER_ARCHITECTURES = ("jumprelu_transcoder", "jumprelu_skip_transcoder")
_ACCEPTED_DTYPES = ("float32", "float16", "bfloat16")

def read_arrays(file: Path) -> dict[str, np.ndarray]:
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


def standard_names(file: Path, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SAELens's and Gemma Scope 2's conventions: lowercase ``w_enc``/``w_dec`` keys, Gemma Scope
    2's ``affine_skip_connection`` (our ``W_skip``, the same (d_in, d_out) orientation); an optional per-latent
    ``scaling_factor`` (all ones is dropped; otherwise folded into the decoder rows, which is
    exact: (f·s)·W_dec = f·(s·W_dec))."""
    arrays = {("W_" + k[2:] if k.startswith("w_") else "W_skip" if k == "affine_skip_connection" else k): v
              for k, v in raw.items()}
    if len(arrays) != len(raw):
        raise ValueError(f"{file}: holds both lowercase and uppercase copies of a weight ({', '.join(sorted(raw))})")
    scale = arrays.pop("scaling_factor", None)
    if scale is not None and "W_dec" in arrays and not np.allclose(scale, 1.0):
        if scale.ndim not in (0, 1) or (scale.ndim == 1 and scale.shape[0] != arrays["W_dec"].shape[0]):
            raise ValueError(f"{file}: scaling_factor has shape {scale.shape}; expected () or ({arrays['W_dec'].shape[0]},)")
        arrays["W_dec"] = arrays["W_dec"] * np.reshape(scale, (-1, 1))
    return arrays


def check_arrays(file: Path, arrays: dict[str, np.ndarray], architecture: str) -> tuple[int, int]:
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
    d_out = d_in
    if architecture in TRANSCODER_ARCHITECTURES and arrays["W_dec"].ndim == 2:
        d_out = arrays["W_dec"].shape[1]
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
                "threshold": (d_sae,), "W_skip": (d_in, d_out)}
    for name in names:
        if arrays[name].shape != expected[name]:
            raise ValueError(
                f"{file}: {name} has shape {arrays[name].shape}, but W_enc {(d_in, d_sae)} implies {expected[name]}"
            )
        if not np.isfinite(arrays[name]).all():
            raise ValueError(f"{file}: {name} contains NaN or Inf")
    return d_in, d_sae


def params_file(path: Path) -> Path:
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
