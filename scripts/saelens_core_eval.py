"""SAELens's own core evaluation (``sae_lens.evals.run_evals``) on given SAE folders, model and tokens.

Runs in the SAELens environment (``scripts/peer-envs.sh saelens``), not in saescope's: it imports
nothing from saescope.  tests/test_saebench_core.py and benchmarks/saebench_core.py call it in a
subprocess, so both libraries see the same SAE (a saescope export), weights and token batch.

    python saelens_core_eval.py SPEC.json      # prints one JSON line: {folder: metrics}

SPEC: ``model`` (a saved Hugging Face folder), ``official_name`` (TransformerLens's name for it, e.g.
``google/gemma-3-270m``; absent: a GPT-2-architecture model whose TransformerLens config is built
from its own config.json, for tiny random test models), ``tokens`` (an .npy of (N, T) ids),
``special`` (token ids SAELens leaves out, its ``exclude_special_tokens``), ``saes`` (SAELens
folders), ``batch_prompts`` (rows per reconstruction batch; the sparsity/variance metrics use all
N rows as one batch).

The tokens reach SAELens through a minimal stand-in for its ActivationsStore that hands out the
given rows in order (``get_batch_tokens``) and starts again at ``reset_input_dataset``: every
metric is computed and aggregated by SAELens's code.  ``frac_alive`` and the ``freq_over_*``
figures are SAEBench's ``calculate_misc_metrics`` (sae_bench/evals/core/main.py) applied to
SAELens's ``feature_density``; SAEBench itself is not installed.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch


class FixedTokens:
    """The part of ``ActivationsStore`` that ``run_evals`` uses, over a fixed (N, T) batch."""

    def __init__(self, tokens: torch.Tensor, batch_prompts: int):
        self.tokens, self.store_batch_size_prompts = tokens, batch_prompts
        self.context_size = tokens.shape[1]
        self.next = 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        if self.next + n > len(self.tokens):
            raise RuntimeError(f"asked for rows {self.next}..{self.next + n} of {len(self.tokens)}")
        rows = self.tokens[self.next:self.next + n]
        self.next += n
        return rows

    def reset_input_dataset(self) -> None:
        self.next = 0


def load_model(spec: dict):
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.float32).eval()
    if spec.get("official_name"):
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        model = HookedTransformer.from_pretrained_no_processing(
            spec["official_name"], hf_model=hf, tokenizer=tokenizer, device="cpu", dtype=torch.float32)
        return model, hf
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    c = hf.config
    if c.model_type != "gpt2":
        raise ValueError(f"without official_name only GPT-2 models are built here, not {c.model_type}")
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn=c.activation_function, eps=c.layer_norm_epsilon,
        normalization_type="LN", positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval(), hf


def misc_metrics(feature_density: list[float]) -> dict:
    """SAEBench's calculate_misc_metrics, the firing-frequency part."""
    d = torch.tensor(feature_density, dtype=torch.float32)
    total = d.sum()
    return {
        "frac_alive": (d > 0).float().mean().item(),
        "freq_over_1_percent": (d > 0.01).float().mean().item(),
        "freq_over_10_percent": (d > 0.1).float().mean().item(),
        "normalized_freq_over_1_percent": (d[d > 0.01].sum() / total).item() if total > 0 else 0.0,
        "normalized_freq_over_10_percent": (d[d > 0.1].sum() / total).item() if total > 0 else 0.0,
    }


def main(spec: dict) -> dict:
    from sae_lens import SAE
    from sae_lens.evals import get_eval_everything_config, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    torch.set_grad_enabled(False)
    model, hf = load_model(spec)
    tokens = torch.from_numpy(np.load(spec["tokens"])).long()
    with torch.no_grad():  # the TransformerLens model is the Hugging Face one
        rows = tokens[: min(2, len(tokens))]
        logit_gap = (model(rows) - hf(rows).logits).abs().max().item()
    special = [int(t) for t in spec["special"]]
    out = {"_info": {"tl_vs_hf_max_logit_gap": logit_gap}}
    n_rows, batch = len(tokens), int(spec["batch_prompts"])
    for folder in spec["saes"]:
        sae = SAE.load_from_disk(folder, device="cpu")
        # reconstruction and loss metrics: n_rows / batch batches of `batch` rows
        loss_cfg = get_eval_everything_config(batch_size_prompts=batch, n_eval_reconstruction_batches=n_rows // batch,
                                              n_eval_sparsity_variance_batches=1)
        for name in ("compute_l2_norms", "compute_sparsity_metrics", "compute_variance_metrics",
                     "compute_featurewise_density_statistics", "compute_featurewise_weight_based_metrics"):
            setattr(loss_cfg, name, False)
        loss_metrics, _ = run_evals(sae, FixedTokens(tokens, batch), model, ActivationScaler(), loss_cfg,
                                    exclude_special_tokens=special)
        # sparsity and variance: every row as one batch (so relative_reconstruction_bias, a ratio
        # of means per batch averaged over batches, is one ratio over all tokens)
        recon_cfg = get_eval_everything_config(batch_size_prompts=n_rows, n_eval_reconstruction_batches=1,
                                               n_eval_sparsity_variance_batches=1)
        recon_cfg.compute_kl = recon_cfg.compute_ce_loss = False
        recon_metrics, features = run_evals(sae, FixedTokens(tokens, n_rows), model, ActivationScaler(), recon_cfg,
                                            exclude_special_tokens=special)
        metrics = {**loss_metrics, **recon_metrics}
        metrics.pop("token_stats", None)
        metrics["misc_metrics"] = misc_metrics(features["feature_density"])
        metrics["hook_name"] = sae.cfg.metadata.hook_name
        out[folder] = metrics
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = main(json.load(f))
    print(json.dumps(result))
