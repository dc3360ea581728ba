"""The evaluation suite: prefix-cached forwards, the metrics it reports, the files it writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_ARCHS, TINY_VOCAB

from saescope.forward import clean_forward, forward_from, lm_logits, matmul_weights_in
from saescope.evaluate.splice import splice
from saescope.evaluate.suite import EvalConfig, evaluate, loss_sequences, position_bins, scored_positions
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


def _brute_force(model, corpus, site, sae, scored=None):
    """Delta loss, KL and FVU the slow way: full forwards with the public splice API."""
    ids = torch.from_numpy(corpus.input_ids)
    keep = torch.from_numpy(corpus.keep_mask)
    if scored is None:
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
    fvu_std = (((x - x_hat) ** 2).sum(0) / ((x - x.mean(0)) ** 2).sum(0)).mean()  # each dimension 1/D
    return {"delta_loss": float(ce(lp_spliced) - ce(lp_clean)), "kl_div": float(kl), "fvu": float(fvu),
            "fvu_std": float(fvu_std),
            "l0": float((sae.encode(x.float()) != 0).sum(-1).double().mean())}


# gemma3 and gpt2 take the linear-head route of lm_scores, gemma2 (soft-capped logits) the direct one
@pytest.mark.parametrize("arch", ["gemma3", "gemma2", "gpt2"])
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
        for key in ("delta_loss", "kl_div", "fvu", "fvu_std", "mse", "l0", "cossim", "frac_dead"):
            assert three["saes"][name][key] == pytest.approx(one["saes"][name][key], rel=1e-6, abs=1e-7)


def test_loss_tokens_restricts_loss_metrics_to_whole_sequences(gemma):
    corpus = fake_corpus(n_seqs=6, seq_len=32)
    site = Site(1, "attn_z")
    sae = random_sae(site_width(gemma, site))
    full = evaluate(gemma, corpus, {"s": (site, sae)}, EvalConfig(progress=False, batch_seqs=2))
    part = evaluate(gemma, corpus, {"s": (site, sae)},
                    EvalConfig(progress=False, loss_tokens=50, seed=3, zero_ablation=False, batch_seqs=2))
    chosen = loss_sequences(corpus, 50, seed=3)
    assert part["info"]["loss_sequences"] == chosen.sum() == 2  # ~27 scored tokens per sequence
    assert part["info"]["n_loss_tokens"] == scored_positions(corpus)[chosen].sum() >= 50
    sub = TokenizedCorpus(*(a[chosen] for a in (corpus.input_ids, corpus.doc_ids, corpus.subset_ids,
                                                corpus.keep_mask)), corpus.subsets, "chosen")
    expected = _brute_force(gemma, sub, site, sae)
    m = part["saes"]["s"]
    assert m["delta_loss"] == pytest.approx(expected["delta_loss"], rel=1e-4, abs=1e-5)
    assert m["kl_div"] == pytest.approx(expected["kl_div"], rel=1e-4, abs=1e-6)
    for key in ("fvu", "l0", "mse", "frac_dead"):  # every kept token still counts
        assert m[key] == pytest.approx(full["saes"]["s"][key], rel=1e-9)
    assert math.isnan(m["ce_loss_score"]) and math.isnan(m["ce_zero_ablation"])  # no zero ablation ran
    assert loss_sequences(corpus, 10**6).all() and loss_sequences(corpus, None).all()
    with pytest.raises(ValueError, match="loss_tokens"):
        EvalConfig(loss_tokens=0)


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


WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "big", "small", "red", "blue", "and", "then", "it", "was"]


def _release_with_model(tmp_path, tiny_model):
    """A tiny Gemma 3 saved with a word-level tokenizer, a .txt corpus and three released
    JumpReLU SAEs (two at one site), all on disk as a user would have them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from saescope.release import release_folder, save_sae
    from saescope.sae.base import SAEConfig
    from saescope.sae.jumprelu import JumpReLUSAE

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                        unk_token="<unk>", pad_token="<pad>")
    model = tiny_model("gemma3", vocab_size=len(vocab), bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.jsonl"  # one document per line, two subsets
    corpus.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(WORDS, 12)), "subset": f"s{i % 2}"})
                                for i in range(400)))
    release = tmp_path / "run" / "release"
    for i, (site, threshold) in enumerate([(Site(0, "mlp_out"), 0.1), (Site(0, "mlp_out"), 0.3),
                                           (Site(2, "resid_post"), 0.2)]):
        torch.manual_seed(i)
        sae = JumpReLUSAE(SAEConfig(d_in=site_width(model, site), d_sae=32, threshold_init=threshold))
        sae.fold_input_scale(1.0)
        save_sae(sae, release_folder(release, site, 32, 10 * (i + 1)),
                 config={"model": str(model_dir), "site": site.name}, metrics={"train_l0": 12.5})
    return model, tokenizer, corpus, release


def test_evaluate_release_writes_metrics_and_groups_by_memory(tmp_path, tiny_model):
    from saescope.jsonio import read_json
    from saescope.evaluate.suite import evaluate_release
    from saescope.tokens import load_corpus

    model, tokenizer, corpus_path, release = _release_with_model(tmp_path, tiny_model)
    corpus = load_corpus(str(corpus_path), tokenizer, seq_len=32, max_tokens=400, split="heldout")
    cfg = EvalConfig(progress=False)
    one_group = evaluate_release(release, model, corpus, cfg, model_name="tiny")
    folders = sorted(p.parent for p in release.rglob("params.npz"))
    first = {f: read_json(f / "metrics.json") for f in folders}
    three_groups = evaluate_release(release, model, corpus, cfg, model_name="tiny", sae_memory_mb=0)
    assert one_group["saes"].keys() == three_groups["saes"].keys() and len(folders) == 3
    for folder in folders:
        sections = read_json(folder / "metrics.json")
        assert sections["training"] == {"train_l0": 12.5}  # the trainer's figures are kept apart
        metrics = sections["eval"]
        assert metrics["site"] == read_json(folder / "config.json")["site"]
        for key in ("l0", "fvu", "mse", "cossim", "l2_ratio", "delta_loss", "ce_loss_score", "kl_div",
                    "frac_dead", "frac_high_freq", "ce_clean", "ce_spliced", "ce_zero_ablation"):
            assert math.isfinite(metrics[key]), key
            assert metrics[key] == pytest.approx(first[folder]["eval"][key], rel=1e-9), key
        assert metrics["info"]["model"] == "tiny"
    summary = read_json(release / "eval.json")
    assert summary["info"]["n_tokens"] == corpus.n_tokens
    assert set(summary["sites"]) == {"layer_0/mlp_out", "layer_2/resid_post"}


def test_eval_command_end_to_end(tmp_path, tiny_model, capsys):
    from saescope.cli import main

    _, _, corpus_path, release = _release_with_model(tmp_path, tiny_model)
    code = main(["eval", "--release", str(release), "--corpus", str(corpus_path), "--tokens", "300",
                 "--seq-len", "32", "--device", "cpu", "--no-progress", "--report", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "evaluated 3 SAEs" in out and (release / "eval.json").exists()
    assert (tmp_path / "report" / "report.html").exists()
    assert all((p.parent / "metrics.json").exists() for p in release.rglob("params.npz"))

    assert main(["eval", "--release", str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--release", str(release), "--model", str(tmp_path / "no-model")]) == 1
    assert "no-model" in capsys.readouterr().err


@pytest.mark.slow
def test_real_gemma_3_270m_prefix_cache_and_identity():
    """On the real Gemma 3 270M (sliding and full attention layers, 262k vocabulary): the
    prefix-cached spliced forward equals the full forward with the hook, and an identity SAE
    evaluates to delta loss 0 / CE recovered 1."""
    from saescope.models import load_model
    from saescope.sae.jumprelu import JumpReLUSAE

    model, tokenizer = load_model("gemma-3-270m")
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
            "It is named after the engineer Gustave Eiffel, whose company designed and built the tower. ")
    ids = torch.stack([tokenizer(t, return_tensors="pt")["input_ids"][0, :48] for t in (text * 2, text[::-1])])
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    full = model(input_ids=ids[:1]).logits
    _, prefix = clean_forward(model, ids[:1], [6])
    site = Site(6, "attn_z")  # after the first full-attention layer (5)
    torch.manual_seed(0)
    sae = JumpReLUSAE(SAEConfig(d_in=site_width(model, site), d_sae=256, threshold_init=0.01))
    sae.fold_input_scale(1.0)
    with splice(model, {site: sae}):
        reference = model(input_ids=ids[:1]).logits
        cached = lm_logits(model, forward_from(model, ids[:1], site.layer, prefix[site.layer]))
    assert (reference - full).abs().max() > 0.1
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5)

    n, t = ids.shape
    keep = np.broadcast_to(np.arange(t) > 0, (n, t)).copy()
    doc = np.where(keep, np.arange(n)[:, None], -1)
    corpus = TokenizedCorpus(ids.numpy(), doc, np.where(keep, 0, -1).astype(np.int16), keep, ["text"], "eiffel")
    site = Site(9, "resid_post")
    result = evaluate(model, corpus, {"identity": (site, identity_sae(site_width(model, site)))},
                      EvalConfig(progress=False))["saes"]["identity"]
    assert result["delta_loss"] == pytest.approx(0.0, abs=1e-4)
    assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert result["ce_zero_ablation"] > result["ce_clean"] + 1.0  # deleting the residual stream hurts


def test_bfloat16_forwards_agree_with_float32(tiny_model, monkeypatch):
    """bf16 autocast for the model's forwards (SAEs stay fp32): the same metrics within bf16's
    precision, reconstruction on the recon-only sequences unchanged."""
    monkeypatch.setenv("SAESCOPE_CPU_BF16", "1")  # bf16 even on a CPU without bf16 units
    model = tiny_model("gemma3")
    corpus = fake_corpus()
    saes = {str(s): (s, random_sae(site_width(model, s), seed=i))
            for i, s in enumerate([Site(2, "resid_post"), Site(1, "mlp_out")])}
    fp32 = evaluate(model, corpus, saes, EvalConfig(batch_seqs=2, progress=False))
    bf16 = evaluate(model, corpus, saes, EvalConfig(batch_seqs=2, progress=False, dtype="bfloat16"))
    for name in saes:
        a, b = fp32["saes"][name], bf16["saes"][name]
        assert b["kl_div"] >= 0
        for key in ("ce_clean", "ce_spliced", "ce_zero_ablation"):
            assert b[key] == pytest.approx(a[key], rel=2e-2), (name, key)
        assert b["delta_loss"] == pytest.approx(a["delta_loss"], abs=2e-2 * max(1.0, abs(a["delta_loss"])))
        assert b["fvu"] == pytest.approx(a["fvu"], rel=2e-2)
    with pytest.raises(ValueError, match="dtype"):
        EvalConfig(dtype="float16")


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_bf16_weight_copies_match_autocast_and_are_undone(tiny_model, arch):
    """matmul_weights_in gives autocast's numbers (without its per-call weight casts) and puts
    the original parameters back, the tied head included."""
    model = tiny_model(arch)
    before = {name: p for name, p in model.named_parameters()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight is embed.weight
    ids = torch.randint(0, TINY_VOCAB, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = lm_logits(model, clean_forward(model, ids, [])[0])
        with matmul_weights_in(model, torch.bfloat16):
            assert head.weight.dtype == torch.bfloat16
            got = lm_logits(model, clean_forward(model, ids, [])[0])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert {name: p for name, p in model.named_parameters()} == before
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (head.weight is embed.weight) == tied
