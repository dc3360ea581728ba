"""SAEBench's core metrics: saescope's ``saebench`` block against SAELens's own evaluation.

Same SAEs (saescope's, exported to SAELens's format), same weights (a tiny GPT-2 saved to disk,
wrapped by TransformerLens on the other side), same token rows.  SAELens's ``run_evals`` runs in
its own environment (scripts/saelens_core_eval.py, in a subprocess); saescope's ``evaluate`` here.

Where the two count differently by definition (docs/evaluation.md, "SAEBench's core metrics"):

* zero ablation: SAELens zeroes every position, BOS included; saescope keeps BOS clean unless
  ``zero_ablate_bos`` -- set here, and the default's different figure is checked too;
* KL: SAELens averages it over every non-special position, the last one of each row included;
  saescope only over positions that predict a next token.  The test adds the last positions' KL
  (computed here with saescope's splicing API) to saescope's mean, then compares tightly;
* splicing: both leave BOS clean; SAELens also leaves a mid-row EOS clean, saescope splices it.
  The rows here hold one document each (BOS + text), so no EOS occurs -- not covered.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from saescope.evaluate import metrics as M
from saescope.evaluate.batch import ZeroHook
from saescope.evaluate.splice import splice
from saescope.evaluate.suite import EvalConfig, evaluate
from saescope.release.export import export_saelens
from saescope.release.saelens import hook_name
from saescope.release.save import save_sae
from saescope.sae.base import SAEConfig
from saescope.sae.registry import build_sae
from saescope.sites import Site, capture, hook_site
from saescope.tokens import TokenizedCorpus

REPO = Path(__file__).resolve().parents[1]
SAELENS_SIDE = REPO / "scripts" / "saelens_core_eval.py"
#: the SAELens environment scripts/peer-envs.sh builds (sae-lens 6.54.12, transformer-lens 3.9.0, torch 2.13.0 CPU)
SAELENS_PYTHON = Path(os.environ.get("SAESCOPE_PEERS", "/work/peers")) / "saelens" / "bin" / "python"

SITES = (Site(1, "resid_post"), Site(2, "mlp_out"), Site(0, "attn_z"))
N_ROWS, SEQ_LEN, BATCH = 8, 24, 4

# Tolerances.  Once the two definitional differences above are accounted for, both sides average
# the same quantities over the same positions, so what is left is float32 arithmetic: TransformerLens
# re-implements GPT-2 (its own attention and LayerNorm; the logit gap to Hugging Face is ~1e-6),
# SAELens computes KL and CE in float32 and averages in float32 where saescope sums in float64.
# Measured on this test: every figure agrees to <= 1e-5 relative and <= 7e-8 absolute (KL, whose
# per-token value is a difference of two ~5-nat sums).  REL = 1e-5 relative plus ABS = 1e-6 absolute
# leaves an order of magnitude of margin on the absolute part, and stays far below any
# definitional difference (the BOS ablation moves ce_loss_with_ablation by ~1e-2 nats, the last
# positions move the KL by a few percent).  The two scores are ratios whose denominator
# (ablated minus clean) can be small, so their tolerance is propagated from their parts'.
REL, ABS = 1e-5, 1e-6


def _tol(x: float) -> float:
    return ABS + REL * abs(x)


def _score_tol(score: float, top: tuple[float, float], bottom: tuple[float, float]) -> float:
    """Tolerance of score = (a − b) / (a − c), from the parts' own tolerances."""
    (a, b), (_, c) = top, bottom
    return (_tol(a) + _tol(b) + abs(score) * (_tol(a) + _tol(c))) / abs(a - c)


def _sae_for(site: Site, x_ND: torch.Tensor, seed: int):
    """A JumpReLU SAE that keeps the larger half of x's coordinates in a random basis: ±q_i
    latent pairs, threshold at the median of |q·x|.  Latent 0 is dead (huge threshold)."""
    D = x_ND.shape[1]
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    W_dec = torch.cat([Q.T, -Q.T])  # (2D, D): rows ±q_i
    sae = build_sae(SAEConfig(d_in=D, d_sae=2 * D, architecture="jumprelu", centre_input=False))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        # the threshold halfway between the two middle |q·x|: no value sits on it, so float noise
        # between the two implementations flips no latent
        values = (x_ND @ Q).abs().flatten().sort().values
        middle = len(values) // 2
        sae.threshold.fill_(float(values[middle - 1 : middle + 1].mean()))
        sae.threshold[0] = 1e6
    return sae.eval()


def _corpus(ids: np.ndarray, bos: int) -> TokenizedCorpus:
    keep = ids != bos
    doc = np.where(keep, np.arange(len(ids))[:, None], -1)  # one document per row
    return TokenizedCorpus(ids, doc, np.where(keep, 0, -1).astype(np.int16), keep, ["all"], "rows")


@torch.no_grad()
def _last_position_kl(model, ids: torch.Tensor, site: Site, sae) -> tuple[float, float]:
    """Σ over rows of KL(clean ‖ spliced) and KL(clean ‖ zero-ablated, BOS too) at the last position."""
    clean = torch.log_softmax(model(input_ids=ids).logits[:, -1], -1)
    with splice(model, {site: sae}):
        spliced = torch.log_softmax(model(input_ids=ids).logits[:, -1], -1)
    handle = hook_site(model, site, ZeroHook(skip_bos=False))
    try:
        zero = torch.log_softmax(model(input_ids=ids).logits[:, -1], -1)
    finally:
        handle.remove()
    return float(M.kl_div_per_token(clean, spliced).sum()), float(M.kl_div_per_token(clean, zero).sum())


def _close(ours: float, theirs: float, tol: float | None = None) -> bool:
    return abs(ours - theirs) <= (_tol(theirs) if tol is None else tol)


def test_saescope_saebench_block_matches_saelens_run_evals(tmp_path, tiny_model):
    if not SAELENS_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SAELENS_PYTHON} is missing: .ci/run builds it with scripts/peer-envs.sh saelens")
        pytest.skip(f"no SAELens environment at {SAELENS_PYTHON} (bash scripts/peer-envs.sh saelens builds it)")
    model = tiny_model("gpt2")
    bos = model.config.bos_token_id
    model.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, bos, size=(N_ROWS, SEQ_LEN))
    ids[:, 0] = bos
    np.save(tmp_path / "tokens.npy", ids)
    ids_t = torch.from_numpy(ids)
    acts = capture(model, SITES, ids_t)

    saes = {}
    for i, site in enumerate(SITES):
        x_ND = acts[site][:, 1:].reshape(-1, acts[site].shape[-1])
        sae = _sae_for(site, x_ND, seed=i)
        folder = tmp_path / "release" / site.kind / f"layer_{site.layer}" / "width_96" / "average_l0_24"
        save_sae(sae, folder, config={"model": "tiny", "site": site.name})
        saes[folder.relative_to(tmp_path / "release").as_posix()] = (site, sae)
    export_saelens(tmp_path / "release", tmp_path / "saelens")

    spec = {"model": str(tmp_path / "model"), "tokens": str(tmp_path / "tokens.npy"), "special": [bos],
            "batch_prompts": BATCH, "saes": [str(tmp_path / "saelens" / name) for name in saes]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = subprocess.run([str(SAELENS_PYTHON), str(SAELENS_SIDE), str(tmp_path / "spec.json")],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    theirs_all = json.loads(result.stdout.strip().splitlines()[-1])
    assert theirs_all["_info"]["tl_vs_hf_max_logit_gap"] < 1e-4  # TransformerLens runs the same model

    corpus = _corpus(ids, bos)
    field = evaluate(model, corpus, saes, EvalConfig(zero_ablate_bos=True, progress=False))["saes"]
    default = evaluate(model, corpus, saes, EvalConfig(progress=False))["saes"]
    n_scored = N_ROWS * (SEQ_LEN - 2)  # positions 1..T-2 predict a next token
    for name, (site, sae) in saes.items():
        theirs = theirs_all[str(tmp_path / "saelens" / name)]
        assert theirs["hook_name"] == hook_name(site)
        ours = field[name]["saebench"]
        assert ours["token_stats"] == {"total_tokens_eval_reconstruction": n_scored,
                                       "total_tokens_eval_sparsity_variance": N_ROWS * (SEQ_LEN - 1)}
        # the last position of each row: in SAELens's KL mean, not in saescope's
        kl_last_sae, kl_last_zero = _last_position_kl(model, ids_t, site, sae)
        n_kl = n_scored + N_ROWS
        behaviour = ours["model_behavior_preservation"]
        with_sae = (behaviour["kl_div_with_sae"] * n_scored + kl_last_sae) / n_kl
        with_ablation = (behaviour["kl_div_with_ablation"] * n_scored + kl_last_zero) / n_kl
        expected = {
            ("model_behavior_preservation", "kl_div_with_sae"): with_sae,
            ("model_behavior_preservation", "kl_div_with_ablation"): with_ablation,
            ("model_behavior_preservation", "kl_div_score"): M.kl_div_score(with_sae, with_ablation),
        }
        perf = ours["model_performance_preservation"]
        ce_abl, ce_sae, ce_clean = perf["ce_loss_with_ablation"], perf["ce_loss_with_sae"], perf["ce_loss_without_sae"]
        tols = {"ce_loss_score": _score_tol(perf["ce_loss_score"], (ce_abl, ce_sae), (ce_abl, ce_clean)),
                "kl_div_score": _score_tol(expected[("model_behavior_preservation", "kl_div_score")],
                                           (with_ablation, with_sae), (with_ablation, 0.0))}
        for category, figures in ours.items():
            if category == "token_stats":
                continue
            for key, value in figures.items():
                want = expected.get((category, key), value)
                got = theirs[category][key]
                assert np.isfinite(got) and _close(want, got, tols.get(key)), (name, category, key, want, got)
        # the corrections were needed: the KL does count one position more per row ...
        assert not _close(behaviour["kl_div_with_sae"], theirs["model_behavior_preservation"]["kl_div_with_sae"])
        # ... and saescope's default zero ablation (BOS kept) is a different baseline wherever a
        # later layer's attention reads the BOS position (not after the last layer)
        perf = theirs["model_performance_preservation"]
        differs = not _close(default[name]["ce_zero_ablation"], perf["ce_loss_with_ablation"])
        assert differs == (site.layer < model.config.n_layer - 1), name
        assert default[name]["ce_spliced"] == pytest.approx(field[name]["ce_spliced"], rel=1e-12)
        assert 0 < ours["sparsity"]["l0"] < sae.cfg.d_sae and ours["misc_metrics"]["frac_alive"] < 1
