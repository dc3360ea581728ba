"""The splicing API: splice (with and without the error term), features, ablation, steering."""

from __future__ import annotations

import pytest
import torch

from saescope.evaluate.splice import ablate_latents, features_for_text, splice, steer
from saescope.sae.base import SAE, SAEConfig
from saescope.sites import Site, adapter_for, capture, hook_site, site_width


class ReluSAE(SAE):
    """A minimal release-form SAE (encode = ReLU of the pre-activations), random weights."""

    architecture = "test-relu"

    def encode(self, x_BD):
        return torch.relu(self.pre_activations(x_BD))


def random_sae(d_in: int, d_sae: int = 32, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = ReluSAE(SAEConfig(d_in=d_in, d_sae=d_sae, centre_input=False))
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae))
        sae.b_dec.copy_(0.1 * torch.randn(d_in))
    return sae.requires_grad_(False)


class CharTokenizer:
    """Just what features_for_text needs from a tokenizer: one token per character, BOS = 1."""

    bos_token_id = 1

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[self.bos_token_id] + [2 + ord(c) % 250 for c in text]])}

    def convert_ids_to_tokens(self, ids):
        return [chr((i - 2) % 250) for i in ids]


def _ids(seed=0, batch=2, seq=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 300, (batch, seq), generator=g)
    ids[:, 0] = 1
    return ids


@pytest.mark.parametrize("arch", ["gemma3", "llama", "gpt2"])
def test_keep_error_leaves_logits_unchanged_and_exposes_latents(tiny_model, arch):
    model = tiny_model(arch)
    ids = _ids()
    clean = model(input_ids=ids).logits
    sites = [Site(0, "resid_post"), Site(1, "attn_z"), Site(2, "mlp_out")]
    saes = {s: random_sae(site_width(model, s), seed=i) for i, s in enumerate(sites)}
    with splice(model, saes, keep_error=True) as hooks:
        kept = model(input_ids=ids).logits
    torch.testing.assert_close(kept, clean, atol=1e-5, rtol=1e-5)
    for site in sites:
        rec = hooks[site].last
        assert rec.f_BTF.shape == (2, 16, 32)
        torch.testing.assert_close(rec.x_hat_BTD, saes[site](rec.x_BTD))

    with splice(model, saes) as hooks:
        spliced = model(input_ids=ids).logits
    assert (spliced - clean).abs().max() > 1e-2  # a random SAE changes the output
    # the first (BOS) position keeps its clean activation, so its logits are clean
    torch.testing.assert_close(spliced[:, 0], clean[:, 0], atol=1e-5, rtol=1e-5)
    with splice(model, saes, skip_bos=False):
        assert (model(input_ids=ids).logits[:, 0] - clean[:, 0]).abs().max() > 1e-2
    # hooks are gone afterwards, also after an error inside the block
    with pytest.raises(RuntimeError), splice(model, saes):
        raise RuntimeError("boom")
    torch.testing.assert_close(model(input_ids=ids).logits, clean)


def test_spliced_site_holds_the_reconstruction(tiny_model):
    model = tiny_model("gemma3")
    site = Site(1, "mlp_out")
    sae = random_sae(site_width(model, site))
    ids = _ids()
    x = capture(model, [site], ids)[site]
    seen = {}
    with splice(model, {site: sae}):
        # a hook attached after the splice sees the replaced tensor
        handle = hook_site(model, site, lambda t: seen.setdefault("x", t))
        model(input_ids=ids)
        handle.remove()
    torch.testing.assert_close(seen["x"][:, 1:], sae(x)[:, 1:])
    torch.testing.assert_close(seen["x"][:, 0], x[:, 0])


def test_ablate_latents_removes_exactly_their_contribution(tiny_model):
    model = tiny_model("llama")
    site = Site(1, "resid_post")
    sae = random_sae(site_width(model, site))
    ids = _ids()
    x = capture(model, [site], ids)[site]
    f = sae.encode(x)
    latents = [int(i) for i in f[0, 1:].sum(0).topk(3).indices]  # latents that do fire
    seen = {}
    with ablate_latents(model, site, sae, latents):
        handle = hook_site(model, site, lambda t: seen.setdefault("x", t))
        model(input_ids=ids)
        handle.remove()
    expected = x - f[..., latents] @ sae.W_dec[latents]
    torch.testing.assert_close(seen["x"][:, 1:], expected[:, 1:], atol=1e-5, rtol=1e-5)
    assert (seen["x"] - x)[:, 1:].abs().max() > 1e-3
    with pytest.raises(ValueError, match="out of range"), ablate_latents(model, site, sae, [32]):
        pass


@pytest.mark.parametrize("arch", ["gemma3", "llama", "gpt2"])
def test_steering_moves_logits_along_the_decoder_rows_logit_effect(tiny_model, arch):
    model = tiny_model(arch)
    last = Site(2, "resid_post")  # the last block: the decoder row's effect on logits is direct
    sae = random_sae(site_width(model, last))
    latent = 5
    ids = _ids()
    clean = model(input_ids=ids).logits
    # the row's logit effect: the head applied to the final norm of the decoder row alone
    final_norm = adapter_for(model).final_norm(model)
    effect_V = model.get_output_embeddings()(final_norm(sae.W_dec[latent][None]))[0]
    effect_V = effect_V - effect_V.mean()
    scale = capture(model, [last], ids)[last].norm(dim=-1).mean().item()
    for sign in (+1, -1):
        with steer(model, last, sae, latent, sign * 4 * scale):
            steered = model(input_ids=ids).logits
        delta = (steered - clean)[:, 1:].reshape(-1, clean.shape[-1])
        delta = delta - delta.mean(-1, keepdim=True)
        corr = torch.nn.functional.cosine_similarity(delta, effect_V[None].expand_as(delta), dim=-1)
        # at every position the change points along the row's effect (against it for -c)
        assert (sign * corr).min() > 0.3 and (sign * corr).mean() > 0.6, corr
        torch.testing.assert_close(steered[:, 0], clean[:, 0])  # BOS untouched
    with pytest.raises(ValueError, match="out of range"), steer(model, last, sae, 99, 1.0):
        pass


def test_features_for_text_aligns_tokens_and_latents(tiny_model):
    model = tiny_model("gemma3")
    site = Site(1, "attn_z")
    sae = random_sae(site_width(model, site))
    tokenizer = CharTokenizer()
    tokens, f_TF = features_for_text(model, tokenizer, site, sae, "hello")
    assert tokens == list("hello")
    ids = tokenizer("hello")["input_ids"]
    expected = sae.encode(capture(model, [site], ids)[site][0])[1:]
    torch.testing.assert_close(f_TF, expected)
