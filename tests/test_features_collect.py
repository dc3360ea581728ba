"""Feature collectors against brute force: top-k, octave samples, histograms, token index,
and a whole ``collect_features`` pass on a tiny model checked against every activation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saescope.features.stats import (
    Events,
    LatentScale,
    OctaveSampler,
    RunningHistogram,
    RunningTopK,
    TokenIndex,
    octave,
)
from saescope.sae.base import SAE, SAEConfig
from saescope.sites import Site


class TinyReLUSAE(SAE):
    """The smallest SAE that meets the contract, so these tests need no architecture module."""

    architecture = "relu"

    def encode(self, x_BD):
        return torch.relu(self.pre_activations(x_BD))


def sparse_acts(B, T, F, seed, density=0.15, scale=None):
    """Random non-negative activations, most zero; latent f's scale grows with f (or ``scale``)."""
    g = torch.Generator().manual_seed(seed)
    scale_F = torch.linspace(0.01, 50.0, F) if scale is None else torch.full((F,), float(scale))
    acts = torch.rand(B, T, F, generator=g) * scale_F * 2
    acts[torch.rand(B, T, F, generator=g) > density] = 0
    tokens = torch.randint(0, 40, (B, T), generator=g)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[:, 0] = False  # BOS never counts
    return acts, tokens, keep


def batches(n_batches=5, B=3, T=16, F=12, seed=0, grow=True):
    """Batches whose activation scale grows from batch to batch, so ranges must re-bin."""
    out = []
    for i in range(n_batches):
        acts, tokens, keep = sparse_acts(B, T, F, seed + i)
        if grow:
            acts = acts * (4.0**i)
        out.append(Events.from_acts(acts, tokens, keep))
    return out


def all_events(evs):
    """Every event as numpy: global token id, latent, activation, token id."""
    rows = []
    offset = 0
    for ev in evs:
        N = ev.acts_BTF.shape[0] * ev.acts_BTF.shape[1]
        rows.append(np.stack([(ev.n_E + offset).numpy(), ev.f_E.numpy(), ev.a_E.numpy(), ev.token_N[ev.n_E].numpy()], 1))
        offset += N
    return np.concatenate(rows)


def test_events_mask_bos():
    acts, tokens, keep = sparse_acts(2, 8, 5, 0, density=1.0)
    ev = Events.from_acts(acts, tokens, keep)
    assert (ev.acts_BTF[:, 0] == 0).all()
    assert not (ev.n_E % 8 == 0).any()
    assert len(ev.n_E) == int((acts[:, 1:] > 0).sum())


def test_topk_matches_brute_force():
    evs, K, before, after = batches(), 4, 3, 2
    topk = RunningTopK(evs[0].n_latents, K, before, after)
    offset = 0
    for ev in evs:
        topk.update(ev, token_offset=offset)
        offset += ev.acts_BTF.shape[0] * ev.acts_BTF.shape[1]
    all_acts = torch.cat([ev.acts_BTF for ev in evs])  # (B_total, T, F): offsets line up
    flat_NF = all_acts.reshape(-1, all_acts.shape[-1])
    expect_val, expect_n = flat_NF.topk(K, dim=0)
    assert torch.allclose(topk.value_FK, expect_val.T)
    assert (topk.token_FK == expect_n.T).all()  # continuous random values: no ties
    T = all_acts.shape[1]
    for f in range(flat_NF.shape[1]):
        for k in range(K):
            n = int(topk.token_FK[f, k])
            b, t = divmod(n, T)
            for w, dt in enumerate(range(-before, after + 1)):
                want = float(all_acts[b, t + dt, f]) if 0 <= t + dt < T else 0.0
                assert float(topk.window_FKW[f, k, w]) == pytest.approx(want, rel=1e-3, abs=1e-3)


def test_topk_marks_latents_that_fire_less_than_k_times():
    acts = torch.zeros(1, 6, 3)
    acts[0, 2, 1] = 5.0
    ev = Events.from_acts(acts, torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.bool))
    topk = RunningTopK(3, 2, 1, 1)
    topk.update(ev, token_offset=100)
    assert topk.token_FK.tolist() == [[-1, -1], [102, -1], [-1, -1]]


def test_frequency_max_and_histogram_match_brute_force():
    evs, bins = batches(), 16
    scale, hist = LatentScale(evs[0].n_latents), RunningHistogram(evs[0].n_latents, bins)
    for ev in evs:
        old = scale.update(ev)
        hist.update(ev, old, scale.exp_F)
    events = all_events(evs)
    for f in range(evs[0].n_latents):
        a = events[events[:, 1] == f, 2]
        assert int(scale.count_F[f]) == len(a)
        assert float(scale.max_F[f]) == pytest.approx(a.max())
        assert float(scale.sum_F[f]) == pytest.approx(a.sum(), rel=1e-5)
        e = int(scale.exp_F[f])
        assert 2.0 ** (e - 1) < a.max() <= 2.0**e  # the smallest power of two at or above the max
        expect, _ = np.histogram(a, bins=bins, range=(0, 2.0**e))
        assert hist.counts_FH[f].tolist() == expect.tolist()


def test_octave_samples_are_real_events_of_their_octave():
    evs, n_oct, s = batches(), 3, 2
    F = evs[0].n_latents
    scale, sampler = LatentScale(F), OctaveSampler(F, n_oct, s, 2, 1, seed=3)
    offset = 0
    for ev in evs:
        old = scale.update(ev)
        sampler.update(ev, old, scale.exp_F, offset)
        offset += ev.acts_BTF.shape[0] * ev.acts_BTF.shape[1]
    events = all_events(evs)
    act_of = {(int(n), int(f)): a for n, f, a, _ in events}
    for f in range(F):
        a = events[events[:, 1] == f, 2]
        j_all = octave(torch.as_tensor(a), torch.full((len(a),), int(scale.exp_F[f]))).clamp(0, n_oct - 1).numpy()
        for j in range(n_oct):
            slots = range((f * n_oct + j) * s, (f * n_oct + j + 1) * s)
            got = [int(sampler.token_S[i]) for i in slots if sampler.token_S[i] >= 0]
            assert len(got) == min(s, int((j_all == j).sum())), (f, j)
            assert len(set(got)) == len(got)
            for i, n in zip(slots, got):
                assert act_of[(n, f)] == pytest.approx(float(sampler.value_S[i]))
                assert int(octave(sampler.value_S[i : i + 1], scale.exp_F[f : f + 1]).clamp(0, n_oct - 1)) == j


def test_octave_samples_are_uniform():
    """Each of 12 events in one octave, streamed in 3 batches, is kept with probability s/12."""
    acts = torch.zeros(3, 5, 1)
    acts[:, 1:, 0] = torch.linspace(5.0, 7.9, 12).reshape(3, 4)  # all in (4, 8]: octave 0
    keep = torch.ones(1, 5, dtype=torch.bool)
    tokens = torch.zeros(1, 5, dtype=torch.long)
    seen = np.zeros(15)
    trials, s = 600, 3
    for seed in range(trials):
        scale, sampler = LatentScale(1), OctaveSampler(1, 2, s, 0, 0, seed=seed)
        for b in range(3):
            ev = Events.from_acts(acts[b : b + 1], tokens, keep)
            old = scale.update(ev)
            sampler.update(ev, old, scale.exp_F, token_offset=5 * b)
        kept = sampler.token_S[:s]
        assert (kept >= 0).all()
        seen[kept.numpy()] += 1
    frac = seen[[n for n in range(15) if n % 5]] / trials
    assert np.allclose(frac, s / 12, atol=0.08), frac  # binomial sd ~0.018


def test_token_index_matches_brute_force():
    evs, m = batches(grow=False), 3
    index = TokenIndex(torch.arange(0, 40), m)
    for ev in evs:
        index.update(ev)
    events = all_events(evs)
    for v in range(40):
        here = events[events[:, 3] == v]
        best = {}
        for _, f, a, _ in here:
            best[int(f)] = max(best.get(int(f), 0.0), a)
        expect = sorted(best.items(), key=lambda kv: -kv[1])[:m]
        got = [(int(f), float(a)) for f, a in zip(index.latent_VM[v], index.value_VM[v]) if f >= 0]
        assert [f for f, _ in got] == [f for f, _ in expect]
        assert [a for _, a in got] == pytest.approx([a for _, a in expect])


# --------------------------------------------------------------------------------------------
# The whole pass on a tiny model, against brute force over every activation.


def tiny_corpus(N=10, T=32, vocab=300, seed=0):
    from saescope.tokens import TokenizedCorpus

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(N, T))
    ids[:, 0] = 2  # BOS
    doc = np.repeat(np.arange(2 * N).reshape(N, 2), T // 2, axis=1)
    doc[:, 0] = -1
    ids[:, T // 2] = 1  # EOS between the two documents of each sequence
    doc[:, T // 2] = -1
    return TokenizedCorpus(ids, doc, np.where(doc >= 0, 0, -1).astype(np.int16), doc >= 0, ["all"], "random")


class FakeTokenizer:
    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


def tiny_saes(model, d_sae=24):
    from saescope.sites import Site, site_width

    saes = {}
    for i, site in enumerate([Site(0, "attn_z"), Site(1, "resid_post"), Site(1, "mlp_out")]):
        torch.manual_seed(10 + i)
        sae = TinyReLUSAE(SAEConfig(d_in=site_width(model, site), d_sae=d_sae, architecture="relu", centre_input=False))
        with torch.no_grad():
            sae.b_enc.fill_(-0.3)
        saes[f"{site.kind}/layer_{site.layer}/width_{d_sae}/average_l0_1"] = (site, sae)
    return saes


def test_collect_features_matches_brute_force(tiny_model, tmp_path):
    from saescope.features.collect import FeatureConfig, collect_features
    from saescope.features.store import FeatureStore
    from saescope.sites import capture

    model = tiny_model("gemma3")
    corpus = tiny_corpus()
    saes = tiny_saes(model)
    for _, sae in saes.values():
        sae.requires_grad_(False)
    cfg = FeatureConfig(top_k=3, n_octaves=3, samples_per_octave=2, before=4, after=2, batch_tokens=64, progress=False)
    path = collect_features(model, FakeTokenizer(), corpus, saes, tmp_path, cfg)
    store = FeatureStore(tmp_path)
    assert store.path == path and store.meta["n_tokens"] == corpus.n_tokens

    ids = torch.as_tensor(corpus.input_ids)
    acts = capture(model, [site for site, _ in saes.values()], ids)
    keep = torch.as_tensor(corpus.keep_mask)
    for row in store.saes():
        site, sae = saes[row["name"]]
        f_NTF = torch.relu(acts[site] @ sae.W_enc + sae.b_enc) * keep[..., None]
        flat = f_NTF.reshape(-1, f_NTF.shape[-1])
        assert row["average_l0"] == pytest.approx(float((flat > 0).sum()) / corpus.n_tokens)
        for latent in (0, 5, 17):
            card = store.latent(row["sae"], latent)
            assert card["n_fired"] == int((flat[:, latent] > 0).sum())
            assert card["frequency"] == pytest.approx(card["n_fired"] / corpus.n_tokens)
            top = [c for c in card["contexts"] if c["kind"] == "top"]
            want_val, want_n = flat[:, latent].topk(3)
            assert [c["act"] for c in top] == pytest.approx(want_val.tolist(), rel=1e-5)
            T = corpus.input_ids.shape[1]
            for c, n in zip(top, want_n.tolist()):
                assert (c["seq"], c["pos"]) == divmod(n, T)
                # the window holds the activating token at `focus`, never crosses EOS or BOS
                assert c["text"][c["focus"]] == f" w{corpus.input_ids[c['seq'], c['pos']]}"
                assert " w1" not in c["text"] and " w2" not in c["text"]
                lo = c["pos"] - c["focus"]
                want = f_NTF[c["seq"], lo : lo + len(c["acts"]), latent]
                assert c["acts"] == pytest.approx(want.tolist(), rel=2e-3, abs=2e-3)
            for c in card["contexts"]:
                if c["kind"] != "top":
                    assert c["act"] == pytest.approx(float(f_NTF[c["seq"], c["pos"], latent]), rel=1e-5)
            assert sum(card["histogram"]) == card["n_fired"]
            assert len(card["top_logits"]) == 10 and card["top_logits"][0][1] >= card["top_logits"][-1][1]


def test_collect_features_rejects_empty(tiny_model, tmp_path):
    from saescope.features.collect import collect_features

    with pytest.raises(ValueError, match="no SAEs"):
        collect_features(tiny_model("gemma3"), FakeTokenizer(), tiny_corpus(), {}, tmp_path)


# --------------------------------------------------------------------------------------------
# Direct logit effect, against the maths written out by hand for each norm family.


@pytest.mark.parametrize("arch", ["gemma3", "llama", "gpt2"])
@pytest.mark.parametrize("kind", ["resid_post", "attn_z"])
def test_logit_effects_by_hand(tiny_model, arch, kind):
    from saescope.features.logits import logit_effects
    from saescope.sites import Site, site_width

    model = tiny_model(arch)
    site = Site(1, kind)
    g = torch.Generator().manual_seed(0)
    W_dec_FD = torch.randn(7, site_width(model, site), generator=g)
    if arch == "gemma3":
        block, final = model.model.layers[1], model.model.norm
        d = W_dec_FD @ block.self_attn.o_proj.weight.T * (1 + block.post_attention_layernorm.weight) if kind == "attn_z" else W_dec_FD
        d = d * (1 + final.weight)  # Gemma's RMSNorm multiplies by (1 + w)
    elif arch == "llama":
        block, final = model.model.layers[1], model.model.norm
        d = W_dec_FD @ block.self_attn.o_proj.weight.T if kind == "attn_z" else W_dec_FD  # no sandwich norm
        d = d * final.weight  # Llama's RMSNorm multiplies by w
    else:
        block, final = model.transformer.h[1], model.transformer.ln_f
        d = W_dec_FD @ block.attn.c_proj.weight if kind == "attn_z" else W_dec_FD  # Conv1D: x @ W
        d = (d - d.mean(-1, keepdim=True)) * final.weight  # LayerNorm centres, then scales
    effect_FV = d @ model.lm_head.weight.T
    top_ids, top_vals, bot_ids, bot_vals = logit_effects(model, site, W_dec_FD, n_tokens=5, chunk=3)
    want_top, want_bot = effect_FV.topk(5, dim=1), effect_FV.topk(5, dim=1, largest=False)
    assert torch.allclose(top_vals, want_top.values, rtol=1e-4, atol=1e-5)
    assert (top_ids == want_top.indices).all()
    assert torch.allclose(bot_vals, want_bot.values, rtol=1e-4, atol=1e-5)
    assert (bot_ids == want_bot.indices).all()


def test_bf16_shortlist_gives_the_float32_answer(tiny_model):
    from saescope.features.logits import logit_effects
    from saescope.sites import Site

    model = tiny_model("gemma3", vocab_size=4000)
    W_dec_FD = torch.randn(40, 48, generator=torch.Generator().manual_seed(1))
    exact = logit_effects(model, Site(2, "resid_post"), W_dec_FD)
    fast = logit_effects(model, Site(2, "resid_post"), W_dec_FD, shortlist_dtype=torch.bfloat16)
    for e, f in zip(exact, fast):
        assert torch.equal(e, f) if e.dtype == torch.int64 else torch.allclose(e, f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [20_000, 20_480])  # with and without a padded last block
def test_blocked_topk_finds_the_topk_sets(width):
    from saescope.features.logits import blocked_topk

    x = torch.randn(6, width, generator=torch.Generator().manual_seed(2))
    x[0, width - 1], x[1, width - 1] = 100.0, -100.0  # extremes in the last block
    top, bottom = blocked_topk(x, 30)
    assert torch.equal(top.sort(dim=1).values, x.topk(30, dim=1).indices.sort(dim=1).values)
    assert torch.equal(bottom.sort(dim=1).values, x.topk(30, dim=1, largest=False).indices.sort(dim=1).values)


def test_features_read_every_folder_eval_reads(tmp_path):
    """Bug fixed: ``saescope features`` skipped folders without config.json (Gemma Scope's) that
    ``saescope eval`` and ``load_sae`` accept; both now find and place folders the same way."""
    import numpy as np

    from saescope.features.collect import load_release_saes
    from saescope.release.layout import find_sae_folders

    rng = np.random.default_rng(0)
    root = tmp_path / "gemma-scope-2b-pt-mlp"
    folder = root / "layer_3/width_16k/average_l0_71"
    folder.mkdir(parents=True)
    d_in, d_sae = 6, 16384
    np.savez(folder / "params.npz", W_enc=rng.normal(size=(d_in, d_sae)).astype(np.float32),
             W_dec=rng.normal(size=(d_sae, d_in)).astype(np.float32), b_enc=np.zeros(d_sae, np.float32),
             b_dec=np.zeros(d_in, np.float32), threshold=np.full(d_sae, 0.1, np.float32))
    saes, models = load_release_saes(root)
    assert list(saes) == ["layer_3/width_16k/average_l0_71"] == [p.relative_to(root).as_posix()
                                                                for p in find_sae_folders(root)]
    site, sae = saes["layer_3/width_16k/average_l0_71"]
    assert site == Site(3, "mlp_out") and sae.cfg.d_sae == d_sae and models == {"gemma-2-2b"}
