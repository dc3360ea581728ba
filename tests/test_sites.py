"""Sites capture exactly the tensor meant, on every supported architecture.

Each block is recomputed *by hand* from its weights (projections as matmuls, norms, rotary
embeddings, GQA, sliding windows and soft-capping written out here, not by calling the model's
modules), starting from the block's input as the model saw it.  The site tensors returned by
:func:`saescope.sites.capture` must match these recomputations.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_ARCHS, TINY_VOCAB

from saescope.sites import (
    Site,
    adapter_for,
    capture,
    hook_site,
    n_layers,
    run_to_layer,
    select_sites,
    site_width,
)

SEQ = 20  # longer than the tiny models' sliding window (8), so windows matter

# ------------------------------------------------------------------------------------------
# Hand-written maths


def linear(x, lin):
    y = x @ lin.weight.T
    return y if lin.bias is None else y + lin.bias


def conv1d(x, conv):  # transformers' Conv1D (GPT-2): weight is (in, out)
    return x @ conv.weight + conv.bias


def rms_norm(x, weight, eps, gemma: bool):
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * (1.0 + weight) if gemma else normed * weight


def layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def heads(x_BTX, head_dim):
    B, T, _ = x_BTX.shape
    return x_BTX.view(B, T, -1, head_dim).transpose(1, 2)  # (B, H, T, hd)


def rope(x_BHTd, theta: float, n_rot: int):
    """Rotary embedding on the first ``n_rot`` dims, 'rotate half' convention."""
    T = x_BHTd.shape[2]
    inv_freq = 1.0 / theta ** (torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, n_rot/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1).float()
    sin = torch.cat([angles.sin(), angles.sin()], -1).float()
    rot, keep = x_BHTd[..., :n_rot], x_BHTd[..., n_rot:]
    half = n_rot // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([rot * cos + rotated * sin, keep], -1)


def attention(q, k, v, scale, window=None, softcap=None):
    """Causal softmax attention with GQA; returns the heads concatenated, (B, T, H*hd)."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    T = q.shape[2]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    z = torch.softmax(scores, dim=-1) @ v  # (B, H, T, hd)
    B, H, T, hd = z.shape
    return z.transpose(1, 2).reshape(B, T, H * hd)


# ------------------------------------------------------------------------------------------
# One block by hand, per family: returns {kind: tensor} from the block's input x


def gemma_block(block, cfg, layer, x):
    eps, hd = cfg.rms_norm_eps, cfg.head_dim
    a = block.self_attn
    h = rms_norm(x, block.input_layernorm.weight, eps, gemma=True)
    q, k, v = heads(linear(h, a.q_proj), hd), heads(linear(h, a.k_proj), hd), heads(linear(h, a.v_proj), hd)
    layer_type = cfg.layer_types[layer]
    if cfg.model_type == "gemma3_text":  # Gemma 3: per-head RMSNorm on q and k, rope base per layer type
        q = rms_norm(q, a.q_norm.weight, eps, gemma=True)
        k = rms_norm(k, a.k_norm.weight, eps, gemma=True)
        theta = cfg.rope_parameters[layer_type]["rope_theta"]
    else:
        theta = cfg.rope_parameters["rope_theta"]
    q, k = rope(q, theta, hd), rope(k, theta, hd)
    window = cfg.sliding_window if layer_type == "sliding_attention" else None
    z = attention(q, k, v, cfg.query_pre_attn_scalar**-0.5, window, cfg.attn_logit_softcapping)
    mid = x + rms_norm(linear(z, a.o_proj), block.post_attention_layernorm.weight, eps, gemma=True)
    h2 = rms_norm(mid, block.pre_feedforward_layernorm.weight, eps, gemma=True)
    m = block.mlp
    mlp = linear(gelu_tanh(linear(h2, m.gate_proj)) * linear(h2, m.up_proj), m.down_proj)
    mlp_out = rms_norm(mlp, block.post_feedforward_layernorm.weight, eps, gemma=True)
    return {"attn_z": z, "mlp_out": mlp_out, "resid_post": mid + mlp_out}


def llama_block(block, cfg, layer, x):
    eps = cfg.rms_norm_eps
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    a = block.self_attn
    h = rms_norm(x, block.input_layernorm.weight, eps, gemma=False)
    q, k, v = heads(linear(h, a.q_proj), hd), heads(linear(h, a.k_proj), hd), heads(linear(h, a.v_proj), hd)
    theta = cfg.rope_parameters["rope_theta"]
    q, k = rope(q, theta, hd), rope(k, theta, hd)
    window = cfg.sliding_window if cfg.model_type == "mistral" else None
    z = attention(q, k, v, hd**-0.5, window)
    mid = x + linear(z, a.o_proj)
    h2 = rms_norm(mid, block.post_attention_layernorm.weight, eps, gemma=False)
    m = block.mlp
    mlp_out = linear(torch.nn.functional.silu(linear(h2, m.gate_proj)) * linear(h2, m.up_proj), m.down_proj)
    return {"attn_z": z, "mlp_out": mlp_out, "resid_post": mid + mlp_out}


def gpt2_block(block, cfg, layer, x):
    hd = cfg.n_embd // cfg.n_head
    qkv = conv1d(layer_norm(x, block.ln_1), block.attn.c_attn)
    q, k, v = (heads(t, hd) for t in qkv.split(cfg.n_embd, dim=-1))
    z = attention(q, k, v, hd**-0.5)
    mid = x + conv1d(z, block.attn.c_proj)
    mlp_out = conv1d(gelu_tanh(conv1d(layer_norm(mid, block.ln_2), block.mlp.c_fc)), block.mlp.c_proj)
    return {"attn_z": z, "mlp_out": mlp_out, "resid_post": mid + mlp_out}


def neox_block(block, cfg, layer, x):
    hd = cfg.hidden_size // cfg.num_attention_heads
    a = block.attention
    qkv = heads(linear(layer_norm(x, block.input_layernorm), a.query_key_value), 3 * hd)  # per head [q|k|v]
    q, k, v = qkv.chunk(3, dim=-1)
    n_rot = int(hd * cfg.rope_parameters["partial_rotary_factor"])
    theta = cfg.rope_parameters["rope_theta"]
    q, k = rope(q, theta, n_rot), rope(k, theta, n_rot)
    z = attention(q, k, v, hd**-0.5)
    attn_out = linear(z, a.dense)

    def mlp(h):
        return linear(gelu_erf(linear(h, block.mlp.dense_h_to_4h)), block.mlp.dense_4h_to_h)

    if cfg.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
        mlp_out = mlp(layer_norm(x, block.post_attention_layernorm))
        return {"attn_z": z, "mlp_out": mlp_out, "resid_post": x + attn_out + mlp_out}
    mid = x + attn_out
    mlp_out = mlp(layer_norm(mid, block.post_attention_layernorm))
    return {"attn_z": z, "mlp_out": mlp_out, "resid_post": mid + mlp_out}


BY_HAND = {
    "gemma3_text": gemma_block,
    "gemma2": gemma_block,
    "llama": llama_block,
    "qwen2": llama_block,
    "mistral": llama_block,
    "gpt2": gpt2_block,
    "gpt_neox": neox_block,
}


def block_inputs(model, input_ids) -> list[torch.Tensor]:
    """Every block's input hidden states, from one ordinary forward of the whole model."""
    blocks = adapter_for(model).blocks(model)
    inputs: list[torch.Tensor | None] = [None] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):

        def pre(module, args, kwargs, i=i):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_site_matches_a_hand_recomputation(tiny_model, arch):
    model = tiny_model(arch)
    torch.manual_seed(1)
    input_ids = torch.randint(0, TINY_VOCAB, (2, SEQ))
    sites = select_sites("all", n_layers(model))
    got = capture(model, sites, input_ids)
    assert set(got) == set(sites)

    xs = block_inputs(model, input_ids)
    blocks = adapter_for(model).blocks(model)
    by_hand = BY_HAND[model.config.model_type]
    with torch.no_grad():
        for layer, block in enumerate(blocks):
            want = by_hand(block, model.config, layer, xs[layer])
            for kind, expected in want.items():
                site = Site(layer, kind)
                assert got[site].shape == (2, SEQ, site_width(model, site)), site
                torch.testing.assert_close(got[site], expected, atol=2e-5, rtol=1e-4, msg=f"{arch} {site}")
            if layer + 1 < len(blocks):  # resid_post of one block is the next block's input
                torch.testing.assert_close(got[Site(layer, "resid_post")], xs[layer + 1])


def test_hand_attention_is_sensitive_to_the_window_and_softcap(tiny_model):
    """Guard against a vacuous recomputation: the window and soft-cap visibly change attn_z."""
    model = tiny_model("gemma2")
    torch.manual_seed(1)
    input_ids = torch.randint(0, TINY_VOCAB, (1, SEQ))
    x = block_inputs(model, input_ids)[0]
    got = capture(model, [Site(0, "attn_z")], input_ids)[Site(0, "attn_z")]
    cfg = model.config
    assert cfg.layer_types[0] == "sliding_attention"
    for change in ({"sliding_window": None}, {"attn_logit_softcapping": None}):
        saved = {k: getattr(cfg, k) for k in change}
        try:
            for k, v in change.items():
                setattr(cfg, k, v)
            wrong = gemma_block(model.model.layers[0], cfg, 0, x)["attn_z"]
        finally:
            for k, v in saved.items():
                setattr(cfg, k, v)
        assert (wrong - got).abs().max() > 1e-3, change


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_forward_stops_after_the_deepest_needed_layer(tiny_model, arch):
    model = tiny_model(arch)
    blocks = adapter_for(model).blocks(model)
    calls = {"lm_head": 0, "final_norm": 0, **{f"block_{i}": 0 for i in range(len(blocks))}}

    def counter(name):
        def hook(*_):
            calls[name] += 1

        return hook

    handles = [model.lm_head.register_forward_hook(counter("lm_head"))]
    handles.append(adapter_for(model).final_norm(model).register_forward_hook(counter("final_norm")))
    handles += [b.register_forward_hook(counter(f"block_{i}")) for i, b in enumerate(blocks)]
    input_ids = torch.randint(0, TINY_VOCAB, (1, 12))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)  # the counters work: a full forward reaches everything
        assert all(n == 1 for n in calls.values()), calls
        calls.update({k: 0 for k in calls})

        out = capture(model, [Site(1, "mlp_out"), Site(0, "attn_z")], input_ids)
        assert set(out) == {Site(1, "mlp_out"), Site(0, "attn_z")}
        assert calls == {"lm_head": 0, "final_norm": 0, "block_0": 1, "block_1": 1, "block_2": 0}

        calls.update({k: 0 for k in calls})
        assert run_to_layer(model, 0, input_ids=input_ids) is None
        assert calls == {"lm_head": 0, "final_norm": 0, "block_0": 1, "block_1": 0, "block_2": 0}
    finally:
        for h in handles:
            h.remove()
    # the early-stop hook is removed again: a later full forward computes logits
    assert model(input_ids=input_ids).logits.shape == (1, 12, TINY_VOCAB)


def test_a_returned_tensor_replaces_the_site(tiny_model):
    model = tiny_model("llama")
    input_ids = torch.randint(0, TINY_VOCAB, (1, 10))
    replacement = torch.full((1, 10, 48), 0.5)
    handle = hook_site(model, Site(0, "resid_post"), lambda x: replacement)
    try:
        seen = block_inputs(model, input_ids)[1]
    finally:
        handle.remove()
    torch.testing.assert_close(seen, replacement)
    assert not torch.equal(block_inputs(model, input_ids)[1], replacement)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoModelForCausalLM, OPTConfig

    model = AutoModelForCausalLM.from_config(
        OPTConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                  word_embed_proj_dim=32)
    )
    with pytest.raises(ValueError) as err:
        capture(model, [Site(0, "resid_post")], torch.zeros(1, 4, dtype=torch.long))
    msg = str(err.value)
    assert "'opt'" in msg
    for supported in ("gemma2", "gemma3_text", "llama", "mistral", "qwen2", "gpt2", "gpt_neox"):
        assert supported in msg


def test_attn_z_width_is_heads_times_head_dim_on_gemma(tiny_model):
    model = tiny_model("gemma3")
    assert model.config.hidden_size == 48
    assert site_width(model, Site(0, "attn_z")) == 4 * 16
    assert site_width(model, Site(0, "resid_post")) == site_width(model, Site(2, "mlp_out")) == 48
    gpt2 = tiny_model("gpt2")
    assert site_width(gpt2, Site(1, "attn_z")) == 48  # Conv1D output projection


def test_selection_syntax():
    assert len(select_sites("all", 4)) == 12
    assert select_sites("resid_post", 3) == [Site(0, "resid_post"), Site(1, "resid_post"), Site(2, "resid_post")]
    assert select_sites("attn_z@1-2", 4) == [Site(1, "attn_z"), Site(2, "attn_z")]
    assert select_sites("mlp_out@0-6:3", 8) == [Site(0, "mlp_out"), Site(3, "mlp_out"), Site(6, "mlp_out")]
    assert select_sites("all@2", 4) == [Site(2, "attn_z"), Site(2, "mlp_out"), Site(2, "resid_post")]
    assert select_sites("layer_3/attn_z, resid_post@3,layer_3/attn_z", 4) == [Site(3, "attn_z"), Site(3, "resid_post")]
    assert select_sites(["layer_0/mlp_out"], 1) == [Site(0, "mlp_out")]
    assert Site.parse("layer_12/resid_post").name == "layer_12/resid_post"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resid_pre", "unknown site selection"),
        ("layer_9/resid_post", "out of range"),
        ("resid_post@2-9", "out of range"),
        ("resid_post@3-1", "bad layer range"),
        ("resid_post@x", "bad layer range"),
        ("layer_1/attn", "unknown site kind"),
        ("layer_one/attn_z", "bad site name"),
        (" , ", "selects no site"),
    ],
)
def test_selection_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        select_sites(spec, 4)
