"""``saescope features`` and the browser's default loaders, end to end on files only: a tiny
model folder with a real (word-level) tokenizer, a .txt corpus, and JumpReLU SAEs released with
``saescope.release.save_sae``.  Nothing is injected: the live box reloads the model by the name
stored in the database and the SAE from its release folder."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from test_features_server import WORDS


def save_word_model(folder, tiny_model):
    """A tiny Gemma 3 and a WordLevel tokenizer (BOS prepended) saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                        unk_token="<unk>", pad_token="<pad>")
    model = tiny_model("gemma3", vocab_size=len(vocab), bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_features_command_then_browse_api(tmp_path, tiny_model):
    from saescope.cli import main
    from saescope.features.server import create_app
    from saescope.release import release_folder, save_sae
    from saescope.sae.base import SAEConfig
    from saescope.sae.jumprelu import JumpReLUSAE
    from saescope.sites import Site, site_width

    model_dir = tmp_path / "model"
    model = save_word_model(model_dir, tiny_model)
    corpus = tmp_path / "corpus.txt"
    lines = [f"{c} is the capital of {k} and the largest city" for c, k in
             [("Paris", "France"), ("London", "England"), ("Rome", "Italy"), ("Berlin", "Germany")]]
    corpus.write_text("\n\n".join(lines * 40))
    run = tmp_path / "run"
    for i, site in enumerate([Site(0, "mlp_out"), Site(2, "resid_post")]):
        torch.manual_seed(i)
        sae = JumpReLUSAE(SAEConfig(d_in=site_width(model, site), d_sae=32, threshold_init=0.2))
        sae.fold_input_scale(1.0)
        save_sae(sae, release_folder(run / "release", site, 32, 10), config={"model": str(model_dir), "site": site.name})

    code = main(["features", "--release", str(run / "release"), "--corpus", str(corpus), "--tokens", "1000",
                 "--seq-len", "64", "--split", "train", "--no-progress", "--device", "cpu"])
    assert code == 0
    db_path = run / "features" / "features.sqlite"
    db = sqlite3.connect(db_path)
    assert db.execute("SELECT count(*) FROM saes").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM latents").fetchone()[0] == 64
    assert db.execute("SELECT count(*) FROM contexts").fetchone()[0] > 0
    paris = db.execute("SELECT token FROM vocab WHERE text = 'Paris'").fetchone()
    assert paris is not None  # decoded by the saved tokenizer
    db.close()

    client = create_app(run).test_client()
    saes = client.get("/api/meta").get_json()["saes"]
    sae_id = next(s["sae"] for s in saes if s["site"] == "layer_2/resid_post")
    res = client.post(f"/api/sae/{sae_id}/live", json={"text": "Rome is the capital of Italy", "latent": 0})
    assert res.status_code == 200, res.get_json()
    assert [t["text"] for t in res.get_json()["tokens"]] == ["<bos>", "Rome", "is", "the", "capital", "of", "Italy"]


def test_features_command_rejects_a_missing_release(tmp_path, capsys):
    from saescope.cli import main

    assert main(["features", "--release", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_first_tokens_cuts_whole_sequences():
    import numpy as np

    from saescope.features.collect import first_tokens
    from saescope.tokens import TokenizedCorpus

    keep = np.ones((5, 4), dtype=bool)
    keep[:, 0] = False  # 3 kept tokens per sequence
    c = TokenizedCorpus(np.zeros((5, 4), np.int64), np.zeros((5, 4), np.int64), np.zeros((5, 4), np.int16), keep, ["a"], "x")
    assert len(first_tokens(c, 7)) == 3  # 6 kept tokens in two sequences are not enough
    assert first_tokens(c, 6).n_tokens == 6
    assert first_tokens(c, None) is c and first_tokens(c, 100) is c


@pytest.mark.slow
def test_real_gemma_features_and_token_search(tmp_path):
    """Gemma 3 270M, its SentencePiece tokenizer and wiki-vital: token texts keep their leading
    space, so contexts read as text and ' the' is found by searching 'the'."""
    from saescope.features.collect import FeatureConfig, collect_features
    from saescope.features.store import FeatureStore
    from saescope.models import load_model
    from saescope.sae.base import SAEConfig
    from saescope.sae.jumprelu import JumpReLUSAE
    from saescope.sites import Site
    from saescope.tokens import load_corpus

    model, tokenizer = load_model("gemma-3-270m")
    corpus = load_corpus("wiki-vital", tokenizer, seq_len=128, max_tokens=512, split="heldout")
    site = Site(5, "resid_post")
    torch.manual_seed(0)
    sae = JumpReLUSAE(SAEConfig(d_in=640, d_sae=64, threshold_init=1.0))
    sae.fold_input_scale(1.0)
    sae.requires_grad_(False)
    collect_features(model, tokenizer, corpus, {"resid_post/layer_5/width_64/average_l0_0": (site, sae)},
                     tmp_path, FeatureConfig(progress=False, model_name="gemma-3-270m"))
    store = FeatureStore(tmp_path)
    hits = store.search_token(1, "the")
    tokens = {h["token"] for h in hits}
    assert " the" in tokens and tokens <= {" the", "the", " The", "The", "THE", " THE"}
    card = store.latent(1, hits[0]["latent"])
    words = "".join(card["contexts"][0]["text"]).split(" ")
    assert len(words) >= 5  # decoded tokens keep their spaces: the window reads as text
    assert len(card["top_logits"]) == 10 and card["top_logits"][0][1] > card["bottom_logits"][0][1]
