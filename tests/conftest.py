"""Shared test fixtures: tiny randomly initialised models of every supported architecture.

``tiny_model(arch, **config_overrides)`` builds a 3-layer model from a config (no download) in
well under a second.  Weights get extra random noise on top of the Hugging Face init, so norm
gains are not all 1 and biases not all 0: a test that confuses two tensors (say, the MLP output
before and after Gemma's post-feed-forward norm) then fails instead of passing by accident.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    """Under ``pytest -n N`` (the README's command) each worker computes on one thread, and so do
    the commands its tests launch: N workers of two threads each on N cores would wait on each
    other (OpenMP threads spin), where one each keeps every core busy."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)

#: every architecture family saescope supports, one tiny config each
TINY_ARCHS: tuple[str, ...] = (
    "gemma3",
    "gemma2",
    "llama",
    "qwen2",
    "mistral",
    "gpt2",
    "gpt_neox",  # parallel residual (Pythia)
    "gpt_neox_sequential",  # use_parallel_residual=False
)

TINY_VOCAB = 300


def _tiny_config(arch: str, n_layers: int, **overrides):
    import transformers as tf

    # Sliding windows (8) shorter than the test sequences, GQA (4 query heads, 2 kv heads) and, for
    # Gemma, a head_dim that makes attn_z (4 * 16 = 64) wider than d_model (48).
    gemma_common = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "sliding_window": 8,
        "query_pre_attn_scalar": 24,
        "initializer_range": 0.1,
        "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(n_layers)],
    }
    llama_common = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "initializer_range": 0.1,
    }
    if arch == "gemma3":
        cfg = dict(
            gemma_common,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
        )
        cls = tf.Gemma3TextConfig
    elif arch == "gemma2":
        cfg = dict(gemma_common, attn_logit_softcapping=2.0, final_logit_softcapping=30.0)
        cls = tf.Gemma2Config
    elif arch == "llama":
        cfg, cls = dict(llama_common), tf.LlamaConfig
    elif arch == "qwen2":
        cfg, cls = dict(llama_common), tf.Qwen2Config
    elif arch == "mistral":
        cfg, cls = dict(llama_common, sliding_window=8), tf.MistralConfig
    elif arch == "gpt2":
        cfg = {
            "vocab_size": TINY_VOCAB,
            "n_embd": 48,
            "n_layer": n_layers,
            "n_head": 4,
            "n_positions": 256,
            "initializer_range": 0.1,
            "bos_token_id": TINY_VOCAB - 1,
            "eos_token_id": TINY_VOCAB - 1,
        }
        cls = tf.GPT2Config
    elif arch in ("gpt_neox", "gpt_neox_sequential"):
        cfg = {
            "vocab_size": TINY_VOCAB,
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": n_layers,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "initializer_range": 0.1,
            "use_parallel_residual": arch == "gpt_neox",
            "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
        }
        cls = tf.GPTNeoXConfig
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    cfg.update(overrides)
    return cls(**cfg)


def build_tiny_model(arch: str, *, n_layers: int = 3, seed: int = 0, noise: float = 0.1, **config_overrides):
    """A tiny random causal LM of ``arch`` (see :data:`TINY_ARCHS`), float32, eval mode, no grads."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _tiny_config(arch, n_layers, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.eval().requires_grad_(False)


@pytest.fixture
def tiny_model():
    """Factory fixture: ``tiny_model("gemma3")``, ``tiny_model("gpt2", n_layers=2, seed=1)``."""
    return build_tiny_model


def build_tiny_corpus(n_seqs: int = 12, seq_len: int = 16, *, seed: int = 0, vocab: int = TINY_VOCAB, name="tiny"):
    """A hand-packed :class:`saescope.tokens.TokenizedCorpus` of random documents.

    Every sequence starts with BOS (id 1); documents of random length are packed back to back,
    each ended by EOS (id 2); the last sequence ends in padding (id 0).  ``doc_ids`` count the
    documents, ``subset_ids`` cycle over three subsets; ``keep_mask`` is False at BOS, EOS and
    padding, as the real tokenizer sets it.
    """
    import numpy as np

    from saescope.tokens import TokenizedCorpus

    rng = np.random.default_rng(seed)
    input_ids = np.zeros((n_seqs, seq_len), dtype=np.int64)
    doc_ids = np.full((n_seqs, seq_len), -1, dtype=np.int64)
    keep = np.zeros((n_seqs, seq_len), dtype=bool)
    doc, left = 0, int(rng.integers(3, 2 * seq_len))
    total = n_seqs * seq_len - seq_len // 3  # leave some padding at the very end
    for flat in range(n_seqs * seq_len):
        i, t = divmod(flat, seq_len)
        if t == 0:
            input_ids[i, t] = 1  # BOS
        elif flat >= total:
            input_ids[i, t] = 0  # padding
        elif left == 0:
            input_ids[i, t] = 2  # EOS ends the document
            doc, left = doc + 1, int(rng.integers(3, 2 * seq_len))
        else:
            input_ids[i, t] = rng.integers(3, vocab)
            doc_ids[i, t] = doc
            keep[i, t] = True
            left -= 1
    subset_ids = np.where(keep, doc_ids % 3, -1).astype(np.int16)
    return TokenizedCorpus(input_ids, doc_ids, subset_ids, keep, ["alpha", "beta", "gamma"], name)


@pytest.fixture
def tiny_corpus():
    """Factory fixture: ``tiny_corpus(n_seqs=12, seq_len=16, seed=0)``."""
    return build_tiny_corpus


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds waiting, and on a busy machine a lot of it (a 600-step
    loop took 50 s on 2 contended threads, 2.5 s on one); one thread also gives the distributed
    workers' float results.  Files of tiny-tensor tests use it for every test
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
