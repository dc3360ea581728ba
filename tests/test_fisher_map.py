"""The "fisher" input map: the site Fisher metric, the map's algebra, its exact fold, and a run."""

import json

import numpy as np
import pytest
import torch

from saescope.activations.fisher import site_fisher
from saescope.sae.base import SAEConfig
from saescope.sae.input_norm import InputNorm
from saescope.sae.registry import build_sae
from saescope.sites import Site, hook_site

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(D=24, N=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g) / D**0.5
    x = torch.randn(N, D, generator=g) @ mix * torch.linspace(0.1, 5, D) + torch.linspace(-3, 3, D)
    x[:, 3] *= 40  # a massive dimension, as in Gemma 3
    return x


def _fisher_norm(x, weight=0.5, seed=1):
    D = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D // 2, generator=g, dtype=torch.float64)
    F = A @ A.T  # a low-rank PSD "Fisher"
    xd = x.double()
    cov = torch.cov(xd.T, correction=0)
    return InputNorm.from_fisher(x.shape[0], xd.sum(0), xd.square().sum(0), cov, F, power=0.5, weight=weight), F


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_fisher_map_algebra(weight):
    """E‖x_n‖² = 1; x_n centred; M symmetric with M·M⁻¹ = I; ‖Δx_n‖² = Δxᵀ·G·Δx with
    G = w·F̂ + (1 − w)·G_diag, each part scaled to tr(G·Σ) = 1; to_raw inverts the map."""
    x = _data()
    norm, F = _fisher_norm(x, weight)
    xn = norm.apply(x)
    assert xn.pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=1e-3)
    assert xn.mean(0).abs().max().item() < 1e-4
    M, M_inv = norm.matrix_DD.double(), norm.inverse_DD.double()
    torch.testing.assert_close(M, M.T)
    torch.testing.assert_close(M @ M_inv, torch.eye(24, dtype=torch.float64), atol=1e-4, rtol=0)
    D = x.shape[1]
    cov = torch.cov(x.double().T, correction=0)
    diag = InputNorm.from_sums("diagonal", x.shape[0], x.double().sum(0), x.double().square().sum(0), 0.5)
    G_diag = torch.diag(diag.gain_D.double() ** 2)
    F_r = F + 0.01 * torch.trace(F) / D * torch.eye(D, dtype=torch.float64)
    G = weight * F_r / (F_r * cov).sum() + (1 - weight) * G_diag
    torch.testing.assert_close(M @ M, G, rtol=1e-4, atol=1e-6 * float(G.abs().max()))
    delta = x[:5] - x[5:10]
    lhs = (norm.apply(x[:5]) - norm.apply(x[5:10])).double().pow(2).sum(1)
    rhs = torch.einsum("bi,ij,bj->b", delta.double(), G, delta.double())
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=0)
    torch.testing.assert_close(norm.to_raw(xn[:7] - xn[7:14]), x[:7] - x[7:14], rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("arch,k", [("jumprelu", None), ("batchtopk", 5), ("topk", 5)])
def test_fisher_fold_is_exact_on_raw_activations(arch, k):
    """released(x) == trained(norm(x)) mapped back to raw units; the same latents fire;
    released decoder rows unit-norm (JumpReLU family)."""
    x = _data()
    D, F = x.shape[1], 40
    torch.manual_seed(1)
    sae = build_sae(SAEConfig(d_in=D, d_sae=F, architecture=arch, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.01, 0.1)
    norm, _ = _fisher_norm(x)
    xn = norm.apply(x)
    with torch.no_grad():
        f_train = sae.encode(xn)
        x_hat_train = sae.decode(f_train) @ norm.inverse_DD + norm.shift_D
        released = build_sae(SAEConfig(d_in=D, d_sae=F, architecture=arch, k=k))
        released.load_state_dict(sae.state_dict())
        released.fold_input_norm(norm)
        f_raw = released.encode(x)
        x_hat_raw = released.decode(f_raw)
    assert torch.equal(f_raw != 0, f_train != 0)
    assert torch.allclose(x_hat_raw, x_hat_train, rtol=1e-4, atol=1e-4 * x.abs().max().item())
    if released.latents_rescalable:
        assert torch.allclose(released.W_dec.norm(dim=1), torch.ones(F), atol=1e-5)


def test_site_fisher_is_the_kl_hessian(tiny_model, tiny_corpus):
    """½·eᵀ·F·e predicts KL(p ‖ p_e) for a small change e of one position's activation: F is the
    Fisher of the model's own next-token distribution (labels sampled from the model)."""
    model = tiny_model("gemma3", n_layers=2, seed=3)
    base = tiny_corpus(n_seqs=1, seq_len=8, seed=2)
    t = 4
    keep = np.zeros_like(base.keep_mask)
    # gradients at t and t + 1; predictions are scored where their target is kept: only the one
    # made at t (of token t + 1).  Position t + 1's gradient is then zero, so F is half F_t.
    keep[0, t:t + 2] = True
    n = 3000  # label draws: the estimate's noise falls as 1/√n
    corpus = type(base)(np.repeat(base.input_ids, n, 0), np.repeat(base.doc_ids, n, 0),
                        np.repeat(base.subset_ids, n, 0), np.repeat(keep, n, 0), base.subsets, "one")
    site = Site(1, "resid_post")
    fisher, seen = site_fisher(model, corpus, [site], n_tokens=2 * n, seqs_per_forward=500, dtype=None)
    assert seen == 2 * n
    F = 2 * fisher[site]
    torch.testing.assert_close(F, F.T)
    assert torch.linalg.eigvalsh(F).min() > -1e-8
    ids = torch.as_tensor(base.input_ids)
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=ids).logits[0, t].double(), -1)
    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(4):
        e = torch.randn(F.shape[0], generator=g, dtype=torch.float64)
        e = e / (e @ F @ e).sqrt() * 0.02  # predicted KL 2e-4: well inside the quadratic regime

        def add(a, e=e):
            a = a.clone()
            a[0, t] += e.to(a.dtype)
            return a

        handle = hook_site(model, site, add)
        try:
            with torch.no_grad():
                q = torch.log_softmax(model(input_ids=ids).logits[0, t].double(), -1)
        finally:
            handle.remove()
        kl = float((p.exp() * (p - q)).sum())
        ratios.append(kl / float(0.5 * e @ F @ e))
    assert all(0.85 < r < 1.15 for r in ratios), ratios


def test_site_fisher_refuses_pair_sites_and_empty_input(tiny_model, tiny_corpus):
    model = tiny_model("gemma3", n_layers=2)
    with pytest.raises(ValueError, match="not at a pair site"):
        site_fisher(model, tiny_corpus(), [Site(0, "transcoder")], n_tokens=8)
    with pytest.raises(ValueError, match="no site"):
        site_fisher(model, tiny_corpus(), [], n_tokens=8)


def test_run_with_the_fisher_map_trains_releases_and_resumes(tmp_path, tiny_model, tiny_corpus):
    """Trainer + "fisher": maps from the Fisher callable (called once), kept in the checkpoint
    (a resumed run reads them back: the callable is not called again), folded into the release."""
    from saescope.activations.fisher import fisher_of_sites
    from saescope.activations.online import OnlineSource
    from saescope.release import load_sae
    from saescope.train.recipe import Recipe
    from saescope.train.run import release_results
    from saescope.train.spec import SAESpec
    from saescope.train.trainer import Trainer, TrainOptions

    model = tiny_model("gemma3", n_layers=2, seed=1)
    corpus = tiny_corpus(n_seqs=24, seq_len=16)
    sites = [Site(0, "resid_post"), Site(1, "attn_z")]
    calls = []
    fisher = fisher_of_sites(model, corpus, n_tokens=64)

    def counted(s):
        calls.append(list(s))
        return fisher(s)

    specs = [SAESpec(s, "batchtopk", 32, k=4) for s in sites]
    recipe = Recipe.for_steps(8, lr=1e-2, batch_size=32, input_norm="fisher", input_norm_power=0.5)

    def trainer():
        return Trainer(OnlineSource(model, corpus, sites), specs, recipe, tmp_path, n_steps=8,
                       options=TrainOptions(progress=False, checkpoint_every=4), fisher=counted)

    first = trainer()
    first.n_steps = 8
    results = first.fit()
    assert len(calls) == 1 and all(n.mode == "fisher" and n.matrix_DD is not None for n in first.norms.values())
    ckpt = tmp_path / "checkpoints"
    assert any(p.name == "input_maps.safetensors" for p in ckpt.rglob("*.safetensors"))
    again = trainer()
    again.fit()  # finished: resumes from the last checkpoint, maps read back
    assert len(calls) == 1
    for s in sites:
        torch.testing.assert_close(again.norms[s].matrix_DD, first.norms[s].matrix_DD)
    folders = release_results(first, results)
    for folder, spec in zip(folders, specs):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["input_norm"] == "fisher" and cfg["recipe"]["fisher_weight"] == 0.5
        sae = load_sae(folder)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)


def test_fisher_kinds_choose_the_sites_behind_the_fisher_map(tmp_path, tiny_model, tiny_corpus):
    """fisher_kinds: the Fisher metric is asked for those kinds' sites only; the other SAE sites
    get the diagonal map, and each release names the map it was trained behind."""
    from saescope.activations.fisher import fisher_of_sites
    from saescope.activations.online import OnlineSource
    from saescope.train.recipe import Recipe
    from saescope.train.run import release_results
    from saescope.train.spec import SAESpec
    from saescope.train.trainer import Trainer, TrainOptions

    model = tiny_model("gemma3", n_layers=2, seed=1)
    corpus = tiny_corpus(n_seqs=24, seq_len=16)
    sites = [Site(0, "resid_post"), Site(1, "attn_z")]
    calls = []
    fisher = fisher_of_sites(model, corpus, n_tokens=64)
    recipe = Recipe.for_steps(4, lr=1e-2, batch_size=32, input_norm="fisher", input_norm_power=0.5,
                              fisher_kinds=["resid_post"])
    assert recipe.fisher_kinds == ("resid_post",)
    specs = [SAESpec(s, "batchtopk", 32, k=4) for s in sites]
    trainer = Trainer(OnlineSource(model, corpus, sites), specs, recipe, tmp_path, n_steps=4,
                      options=TrainOptions(progress=False), fisher=lambda s: calls.append(s) or fisher(s))
    folders = release_results(trainer, trainer.fit())
    assert calls == [[sites[0]]]
    assert trainer.norms[sites[0]].mode == "fisher" and trainer.norms[sites[1]].mode == "diagonal"
    assert [json.loads((f / "config.json").read_text())["input_norm"] for f in folders] == ["fisher", "diagonal"]
    with pytest.raises(ValueError, match="fisher_kinds must be among"):
        Recipe(fisher_kinds=("resid",))


def test_fisher_map_is_refused_where_it_cannot_work(tmp_path, tiny_model, tiny_corpus):
    from saescope.activations.online import OnlineSource
    from saescope.train.recipe import Recipe
    from saescope.train.spec import SAESpec
    from saescope.train.trainer import Trainer

    model = tiny_model("gemma3", n_layers=2)
    corpus = tiny_corpus()
    recipe = Recipe.for_steps(4, batch_size=32, input_norm="fisher")
    site = Site(0, "resid_post")
    with pytest.raises(ValueError, match="needs the model's Fisher metric"):
        Trainer(OnlineSource(model, corpus, [site]), [SAESpec(site, "batchtopk", 32, k=4)], recipe, tmp_path,
                n_steps=4)
    tc = Site(0, "transcoder")  # transcoders alone need no Fisher metric: they take the diagonal map
    Trainer(OnlineSource(model, corpus, [tc]), [SAESpec(tc, "batchtopk_transcoder", 32, k=4)], recipe, tmp_path,
            n_steps=4)


def test_fisher_labels_follow_the_model_distribution():
    """The inverse-CDF sampler draws each token with its probability, never a zero-p one."""
    from saescope.activations.fisher import sample_labels

    p_V = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.0, 0.05])
    log_p = p_V.log().expand(40_000, -1).contiguous()
    y = sample_labels(log_p, torch.Generator().manual_seed(0), rows_per_chunk=999)
    freq = torch.bincount(y, minlength=6).double() / len(y)
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, p_V.double(), atol=0.01), freq  # 4.5 sigma at 40k draws
    rows = torch.log_softmax(torch.randn(3, 1000) * 3, -1)  # each row its own distribution
    draws = torch.stack([sample_labels(rows, torch.Generator().manual_seed(s)) for s in range(3000)])
    for r in range(3):
        top = int(rows[r].argmax())
        assert abs((draws[:, r] == top).double().mean() - rows[r, top].exp()) < 0.03
