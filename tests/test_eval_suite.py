"""The evaluation suite: prefix-cached forwards, the metrics it reports, the files it writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_ARCHS, TINY_VOCAB

from saescope.evaluate.forward import clean_forward, forward_from, lm_logits
from saescope.evaluate.splice import splice
from saescope.evaluate.suite import EvalConfig, evaluate, position_bins
from saescope.sae.base import SAE, SAEConfig
from saescope.sites import SITE_KINDS, Site, capture, site_width
from saescope.tokens import TokenizedCorpus


class LinearSAE(SAE):
    """encode = pre-activations (no non-linearity): lets a test build exact identity / zero SAEs."""

    architecture = "test-linear"

    def encode(self, x_BD):
        return self.pre_activations(x_BD)


class ReluSAE(LinearSAE):
    architecture = "test-relu"

    def encode(self, x_BD):
        return torch.relu(self.pre_activations(x_BD))


def identity_sae(d: int) -> SAE:
    sae = LinearSAE(SAEConfig(d_in=d, d_sae=d, centre_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae.requires_grad_(False)


def zero_sae(d: int) -> SAE:
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def random_sae(d: int, d_sae: int = 40, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = ReluSAE(SAEConfig(d_in=d, d_sae=d_sae, centre_input=False))
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae))
    return sae.requires_grad_(False)


def fake_corpus(n_seqs=5, seq_len=24, seed=0) -> TokenizedCorpus:
    """Packed sequences as load_corpus makes them: BOS first, EOS between documents, the last
    sequence right-padded; two subsets."""
    rng = np.random.default_rng(seed)
    bos, eos, pad = 1, 2, 0
    ids = rng.integers(3, TINY_VOCAB, (n_seqs, seq_len))
    ids[:, 0] = bos
    doc = np.zeros((n_seqs, seq_len), np.int64)
    for row in range(n_seqs):  # one document boundary (EOS) in the middle of each sequence
        cut = rng.integers(4, seq_len - 4)
        ids[row, cut] = eos
        doc[row, : cut + 1] = 2 * row
        doc[row, cut + 1 :] = 2 * row + 1
    doc[:, 0] = -1
    ids[-1, -6:] = pad
    doc[-1, -6:] = -1
    keep = (doc >= 0) & (ids != eos)
    subset = np.where(doc >= 0, doc % 2, -1).astype(np.int16)
    return TokenizedCorpus(ids, doc, subset, keep, ["even docs", "odd docs"], "fake")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prefix_cached_spliced_forward_equals_full_forward_with_hook(tiny_model, arch):
    model = tiny_model(arch)
    ids = torch.from_numpy(fake_corpus(2, 20).input_ids)  # 20 > the sliding window (8)
    full = model(input_ids=ids).logits
    hidden, prefix = clean_forward(model, ids, [1, 2])
    torch.testing.assert_close(lm_logits(model, hidden), full, atol=1e-5, rtol=1e-5)
    for site in [Site(1, kind) for kind in SITE_KINDS] + [Site(2, "attn_z")]:
        layer = site.layer
        sae = random_sae(site_width(model, site), seed=layer)
        with splice(model, {site: sae}):
            reference = model(input_ids=ids).logits
            cached = lm_logits(model, forward_from(model, ids, layer, prefix[layer]))
        assert (reference - full).abs().max() > 1e-3, "the SAE must change something"
        torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5, msg=f"{arch} {site}")
    # nothing stays patched: the model computes every block again
    torch.testing.assert_close(model(input_ids=ids).logits, full)


@pytest.fixture
def gemma():
    from conftest import build_tiny_model

    return build_tiny_model("gemma3")


def test_identity_and_zero_saes(gemma):
    corpus = fake_corpus()
    saes = {}
    for kind in SITE_KINDS:
        site = Site(1, kind)
        d = site_width(gemma, site)
        saes[f"identity {kind}"] = (site, identity_sae(d))
        saes[f"zero {kind}"] = (site, zero_sae(d))
    result = evaluate(gemma, corpus, saes, EvalConfig(batch_seqs=2, progress=False))
    for kind in SITE_KINDS:
        ident, zero = result["saes"][f"identity {kind}"], result["saes"][f"zero {kind}"]
        assert ident["delta_loss"] == pytest.approx(0.0, abs=1e-5)
        assert ident["kl_div"] == pytest.approx(0.0, abs=1e-5)
        assert ident["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
        assert ident["fvu"] == pytest.approx(0.0, abs=1e-10) and ident["cossim"] == pytest.approx(1.0)
        assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-4)
        assert zero["delta_loss"] == pytest.approx(zero["ce_zero_ablation"] - zero["ce_clean"], abs=1e-6)
        assert zero["delta_loss"] != pytest.approx(0.0, abs=1e-4)
        assert zero["fvu"] > 1.0  # predicting 0 is worse than predicting the mean
        assert result["sites"][f"layer_1/{kind}"]["ce_zero_ablation"] == pytest.approx(zero["ce_zero_ablation"])


def _brute_force(model, corpus, site, sae):
    """Delta loss, KL and FVU the slow way: full forwards with the public splice API."""
    ids = torch.from_numpy(corpus.input_ids)
    keep = torch.from_numpy(corpus.keep_mask)
    scored = torch.zeros_like(keep)
    scored[:, :-1] = keep[:, :-1] & torch.from_numpy(corpus.doc_ids[:, 1:] >= 0)
    targets = ids[:, 1:][scored[:, :-1]]
    lp_clean = torch.log_softmax(model(input_ids=ids).logits[scored], -1)
    with splice(model, {site: sae}):
        lp_spliced = torch.log_softmax(model(input_ids=ids).logits[scored], -1)
    ce = lambda lp: -lp.gather(-1, targets[:, None]).mean()
    kl = (lp_clean.exp() * (lp_clean - lp_spliced)).sum(-1).mean()
    x = capture(model, [site], ids)[site][keep].double()
    x_hat = sae(x.float()).double()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    return {"delta_loss": float(ce(lp_spliced) - ce(lp_clean)), "kl_div": float(kl), "fvu": float(fvu),
            "l0": float((sae.encode(x.float()) != 0).sum(-1).double().mean())}


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_suite_matches_brute_force_and_is_batch_invariant(tiny_model, arch):
    model = tiny_model(arch)
    corpus = fake_corpus()
    saes = {str(s): (s, random_sae(site_width(model, s), seed=i))
            for i, s in enumerate([Site(0, "attn_z"), Site(2, "resid_post"), Site(1, "mlp_out")])}
    one = evaluate(model, corpus, saes, EvalConfig(batch_seqs=1, progress=False))
    three = evaluate(model, corpus, saes, EvalConfig(batch_seqs=3, progress=False))
    for name, (site, sae) in saes.items():
        expected = _brute_force(model, corpus, site, sae)
        for key, value in expected.items():
            assert one["saes"][name][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, key)
        for key in ("delta_loss", "kl_div", "fvu", "mse", "l0", "cossim", "frac_dead"):
            assert three["saes"][name][key] == pytest.approx(one["saes"][name][key], rel=1e-6, abs=1e-7)


def test_subsets_positions_and_histogram_are_consistent(gemma):
    corpus = fake_corpus(n_seqs=4, seq_len=32)
    site = Site(1, "resid_post")
    result = evaluate(gemma, corpus, {"sae": (site, random_sae(site_width(gemma, site)))},
                      EvalConfig(progress=False))
    m = result["saes"]["sae"]
    assert m["n_tokens"] == corpus.n_tokens
    assert set(m["by_subset"]) == {"even docs", "odd docs"}
    subsets = list(m["by_subset"].values())
    assert sum(s["n_tokens"] for s in subsets) == m["n_tokens"]
    for key, weight in (("l0", "n_tokens"), ("mse", "n_tokens"), ("delta_loss", "n_loss_tokens")):
        pooled = sum(s[key] * s[weight] for s in subsets) / sum(s[weight] for s in subsets)
        assert pooled == pytest.approx(m[key], rel=1e-9)

    by_pos = m["by_position"]
    assert list(zip(by_pos["position_start"], by_pos["position_end"])) == position_bins(32)
    assert position_bins(32) == [(1, 1), (2, 3), (4, 7), (8, 15), (16, 31)]
    kept_per_position = corpus.keep_mask.sum(0)
    assert by_pos["n_tokens"] == [int(kept_per_position[a : b + 1].sum()) for a, b in position_bins(32)]
    pooled = sum(d * n for d, n in zip(by_pos["delta_loss"], by_pos["n_loss_tokens"])) / sum(by_pos["n_loss_tokens"])
    assert pooled == pytest.approx(m["delta_loss"], rel=1e-9)

    hist = m["firing_histogram"]
    assert sum(hist["counts"]) + hist["n_dead"] == m["d_sae"]
    assert hist["n_dead"] / m["d_sae"] == pytest.approx(m["frac_dead"])


def test_bos_is_spliced_only_when_asked(gemma):
    corpus = fake_corpus()
    site = Site(0, "resid_post")
    saes = {"zero": (site, zero_sae(site_width(gemma, site)))}
    skip = evaluate(gemma, corpus, saes, EvalConfig(progress=False))["saes"]["zero"]
    spliced = evaluate(gemma, corpus, saes, EvalConfig(progress=False, splice_bos=True))["saes"]["zero"]
    assert skip["n_tokens"] == spliced["n_tokens"]  # BOS is never counted either way
    assert skip["ce_spliced"] != pytest.approx(spliced["ce_spliced"], abs=1e-4)
    assert skip["ce_loss_score"] == pytest.approx(0.0, abs=1e-4)
    assert spliced["ce_loss_score"] == pytest.approx(0.0, abs=1e-4)


def test_bad_input(gemma):
    corpus = fake_corpus()
    with pytest.raises(ValueError, match="no SAE"):
        evaluate(gemma, corpus, {})
    corpus.keep_mask[:] = False
    site = Site(0, "resid_post")
    with pytest.raises(ValueError, match="no kept tokens"):
        evaluate(gemma, corpus, {"a": (site, identity_sae(site_width(gemma, site)))})
