"""Load a causal LM and its tokenizer from a name, a hub id, a local folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path

from saescope import defaults


def resolve_model(name: str) -> tuple[str, dict]:
    """Map a user's model name to ``from_pretrained`` arguments ``(path_or_id, extra_kwargs)``.

    * ``gemma-3-270m``: the embedded default (converted once to a local folder);
    * a local folder holding ``config.json`` (anything ``save_pretrained`` wrote);
    * a local ``.gguf`` file (de-quantised by transformers);
    * anything else is treated as a Hugging Face hub id (needs the hub or its local cache).
    """
    if name == defaults.DEFAULT_MODEL:
        return str(defaults.gemma_270m_folder()), {}
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json (expected a save_pretrained folder)")
        return str(path), {}
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"model file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        raise ValueError(f"model path {path} is neither a model folder nor a .gguf file")
    if name.count("/") != 1 or name.startswith(("/", ".")):
        raise ValueError(
            f"unknown model {name!r}: use '{defaults.DEFAULT_MODEL}', a local model folder, a .gguf file "
            "or a hub id like 'google/gemma-2-2b'"
        )
    return name, {}


def load_model(name: str, device: str = "cpu", dtype: str = "float32"):
    """Return ``(model, tokenizer)`` in eval mode on ``device``, with gradients disabled."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saescope.sites import adapter_for

    source, kwargs = resolve_model(name)
    torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as err:
        raise ValueError(f"could not load model {name!r}: {err}") from err
    adapter_for(model)  # fail early, naming the supported architectures
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer
