"""circuit-tracer's transcoder-set format (the layout its loaders read).

circuit-tracer 0.5 builds attribution graphs from one transcoder per layer, every layer from 0
of one model.  Its generic loader (``load_relu_transcoder`` in
``circuit_tracer/transcoder/single_layer_transcoder.py``, reached through
``load_transcoder_from_hub`` / ``load_transcoders_from_cache`` in ``circuit_tracer/utils``)
reads a folder holding:

* ``config.yaml``: ``model_kind: transcoder_set``, ``model_name`` (what ``ReplacementModel``
  loads), ``feature_input_hook`` and ``feature_output_hook`` — TransformerLens-style names that
  its nnsight mapping (``circuit_tracer/utils/tl_nnsight_mapping.py``) resolves: ``mlp.hook_in``
  is the MLP's input (Gemma 2/3: the output of ``pre_feedforward_layernorm``, our ``mlp_in``),
  ``hook_mlp_out`` its output (Gemma: after ``post_feedforward_layernorm``, our ``mlp_out``);
* ``layer_{i}.safetensors`` for i = 0 … n−1 with ``W_enc`` (d_sae, d_in) — transposed relative
  to Gemma Scope's (d_in, d_sae): circuit-tracer encodes with ``F.linear(x, W_enc, b_enc)`` —
  ``W_dec`` (d_sae, d_out), ``b_enc`` (d_sae), ``b_dec`` (d_out),
  ``activation_function.threshold`` (d_sae; JumpReLU: ``x·1[x > θ]``) and, for skip
  transcoders, ``W_skip`` (d_out, d_in) — also transposed: it adds ``x @ W_skip.T``.

Such a folder loads with ``load_transcoder_from_hub("/absolute/path/to/folder")`` (a local path
is its own cache entry) and, uploaded to a Hugging Face repo, from the repo id.
"""

from __future__ import annotations

CONFIG_YAML = "config.yaml"
#: the circuit-tracer version whose loader this format was read from (and is tested against)
CIRCUIT_TRACER_VERSION = "0.5.0"
FEATURE_INPUT_HOOK = "mlp.hook_in"
FEATURE_OUTPUT_HOOK = "hook_mlp_out"
TRANSCODER_ARCHITECTURES = ("jumprelu_transcoder", "jumprelu_skip_transcoder")


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def tensors(sae) -> dict:
    """One transcoder's tensors under circuit-tracer's names and orientations (float32, contiguous)."""
    arrays = sae.to_arrays()
    out = {
        "W_enc": arrays["W_enc"].T,  # (d_sae, d_in)
        "W_dec": arrays["W_dec"],  # (d_sae, d_out)
        "b_enc": arrays["b_enc"],
        "b_dec": arrays["b_dec"],
        "activation_function.threshold": arrays["threshold"],
    }
    if "W_skip" in arrays:
        out["W_skip"] = arrays["W_skip"].T  # (d_out, d_in)
    return {name: t.float().contiguous() for name, t in out.items()}


def config_yaml(model_name: str | None, n_layers: int, provenance: dict) -> dict:
    """``config.yaml``'s content; ``provenance`` (where each layer came from) rides along: circuit-tracer
    ignores keys it does not read."""
    return {
        "model_kind": "transcoder_set",
        "model_name": model_name,
        "feature_input_hook": FEATURE_INPUT_HOOK,
        "feature_output_hook": FEATURE_OUTPUT_HOOK,
        "n_layers": n_layers,
        "saescope": provenance,
    }
