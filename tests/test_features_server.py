"""The browser's JSON API on a small generated run (tiny model, tiny SAEs, a word tokenizer).

``build_run`` is shared with tests/test_browser.py, which drives the same run in Chromium.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saescope.sae.base import SAE, SAEConfig

WORDS = [
    "the", "of", "and", "to", "in", "is", "was", "a", "for", "on", "as", "with", "by", "at", "from", "his",
    "her", "that", "which", "it", "Paris", "London", "Rome", "Berlin", "France", "England", "Italy", "Germany",
    "capital", "city", "river", "king", "queen", "war", "born", "died", "built", "first", "largest", "population",
    "university", "church", "museum", "tower", "bridge", "one", "two", "three", "hundred", "thousand",
    "year", "years", "century", "north", "south", "east", "west",
]


class WordTokenizer:
    """A whitespace word tokenizer with the two methods saescope calls (``__call__``, ``decode``).

    Ids: 0 <unk>, 1 <eos>, 2 <bos>, then WORDS; ``decode([i])`` gives ``" word"``.
    """

    bos_token_id, eos_token_id = 2, 1

    def __init__(self):
        self.words = ["<unk>", "<eos>", "<bos>", *WORDS]
        self.ids = {w: i for i, w in enumerate(self.words)}

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, 0) for w in text.split()]

    def __call__(self, text: str, return_tensors=None):
        ids = [self.bos_token_id, *self.encode(text)]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids) -> str:
        return "".join(self.words[i] if i < 3 else " " + self.words[i] for i in ids)


class TinyReLUSAE(SAE):
    architecture = "relu"

    def encode(self, x_BD):
        return torch.relu(self.pre_activations(x_BD))


def make_corpus(tokenizer, n_docs=120, seq_len=48, seed=0):
    """Random sentences from a few templates, packed BOS + docs separated by EOS."""
    from saescope.tokens import TokenizedCorpus

    rng = np.random.default_rng(seed)
    cities = [("Paris", "France"), ("London", "England"), ("Rome", "Italy"), ("Berlin", "Germany")]
    templates = [
        "{c} is the capital of {k} and the largest city",
        "the river in {c} was built by the king in the first century",
        "{c} has a population of two hundred thousand",
        "the museum of {k} is in {c} north of the tower",
    ]
    ids, docs = [], []
    for d in range(n_docs):
        c, k = cities[rng.integers(len(cities))]
        words = tokenizer.encode(templates[rng.integers(len(templates))].format(c=c, k=k))
        ids += words + [tokenizer.eos_token_id]
        docs += [d] * len(words) + [-1]
    per = seq_len - 1
    n = len(ids) // per
    input_ids = np.full((n, seq_len), tokenizer.bos_token_id, dtype=np.int64)
    doc_ids = np.full((n, seq_len), -1, dtype=np.int64)
    input_ids[:, 1:] = np.array(ids[: n * per]).reshape(n, per)
    doc_ids[:, 1:] = np.array(docs[: n * per]).reshape(n, per)
    keep = doc_ids >= 0
    return TokenizedCorpus(input_ids, doc_ids, np.where(keep, 0, -1).astype(np.int16), keep, ["all"], "templates")


def build_run(root, tiny_model_factory, d_sae=64):
    """A run folder with ``features/features.sqlite`` for three SAEs; returns (root, model,
    tokenizer, saes) so a server can run the live box on the same objects."""
    from saescope.features.collect import FeatureConfig, collect_features
    from saescope.sites import Site, site_width

    tokenizer = WordTokenizer()
    model = tiny_model_factory("gemma3", vocab_size=len(tokenizer.words))
    corpus = make_corpus(tokenizer)
    saes = {}
    for i, site in enumerate([Site(1, "resid_post"), Site(2, "resid_post"), Site(1, "attn_z")]):
        torch.manual_seed(i)
        sae = TinyReLUSAE(SAEConfig(d_in=site_width(model, site), d_sae=d_sae, architecture="relu", centre_input=False))
        with torch.no_grad():
            sae.b_enc.fill_(-0.4)
        sae.requires_grad_(False)
        saes[f"{site.kind}/layer_{site.layer}/width_{d_sae}/average_l0_9"] = (site, sae)
    cfg = FeatureConfig(top_k=6, samples_per_octave=2, batch_tokens=768, progress=False, model_name="tiny")
    collect_features(model, tokenizer, corpus, saes, root / "features", cfg)
    return root, model, tokenizer, saes


def make_app(run):
    """The Flask app over ``run`` with the live box wired to the in-memory model and SAEs."""
    from saescope.features.server import create_app

    root, model, tokenizer, saes = run
    by_name = {name: sae for name, (_, sae) in saes.items()}
    return create_app(root, load_model=lambda: (model, tokenizer), load_sae=lambda row: by_name[row["name"]])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from conftest import build_tiny_model

    run = build_run(tmp_path_factory.mktemp("run"), build_tiny_model)
    app = make_app(run)
    app.config["run"] = run
    return app.test_client()


def test_meta_lists_saes(client):
    data = client.get("/api/meta").get_json()
    assert data["meta"]["model"] == "tiny" and data["meta"]["corpus"] == "templates"
    assert sorted(s["site"] for s in data["saes"]) == ["layer_1/attn_z", "layer_1/resid_post", "layer_2/resid_post"]
    assert all(s["d_sae"] == 64 and len(s["density_hist"]) == len(s["density_edges"]) - 1 for s in data["saes"])


def test_latent_card_and_list(client):
    rows = client.get("/api/sae/1/latents?order=max_act&limit=5").get_json()
    assert len(rows) == 5 and rows[0]["max_act"] >= rows[-1]["max_act"]
    card = client.get(f"/api/sae/1/latent/{rows[0]['latent']}").get_json()
    assert card["max_act"] == pytest.approx(rows[0]["max_act"])
    top = [c for c in card["contexts"] if c["kind"] == "top"]
    assert top and top[0]["act"] == pytest.approx(card["max_act"])
    assert all(len(c["text"]) == len(c["acts"]) for c in card["contexts"])
    assert top[0]["acts"][top[0]["focus"]] == pytest.approx(card["max_act"], rel=1e-3)
    assert all(t.startswith(" ") for t, _ in card["top_logits"])  # decoded through the vocab table


def test_token_search_finds_latents_that_fire_on_it(client):
    run = client.application.config["run"]
    _, model, tokenizer, saes = run
    hits = client.get("/api/sae/1/search?token=Paris").get_json()
    assert hits and all(h["token"] == " Paris" for h in hits)
    # brute force: the hit's latent really reaches that activation on some " Paris" token
    from saescope.sites import capture

    site, sae = saes["resid_post/layer_1/width_64/average_l0_9"]
    corpus = make_corpus(tokenizer)
    x = capture(model, [site], torch.as_tensor(corpus.input_ids))[site]
    f = sae.encode(x)[torch.as_tensor(corpus.input_ids) == tokenizer.ids["Paris"]]
    assert float(f[:, hits[0]["latent"]].max()) == pytest.approx(hits[0]["act"], rel=1e-4)
    assert client.get("/api/sae/1/search?token=zzz").get_json() == []


def test_live_box_runs_the_model(client):
    res = client.post("/api/sae/1/live", json={"text": "Paris is the capital of France", "latent": 3}).get_json()
    assert [t["text"] for t in res["tokens"]] == ["<bos>", " Paris", " is", " the", " capital", " of", " France"]
    assert all(isinstance(t["act"], float) for t in res["tokens"])
    assert all(a > 0 for t in res["tokens"] for _, a in t["latents"])


def test_bad_requests_get_clear_errors(client):
    r = client.get("/api/sae/1/latent/64")
    assert r.status_code == 404 and "out of range" in r.get_json()["error"]
    assert client.get("/api/sae/99/latents").status_code == 404
    r = client.get("/api/sae/1/latents?order=nonsense")
    assert r.status_code == 400 and "unknown order" in r.get_json()["error"]
    r = client.post("/api/sae/1/live", json={"text": "  "})
    assert r.status_code == 400 and "type some text" in r.get_json()["error"]


def test_missing_database_is_a_clear_error(tmp_path):
    from saescope.features.server import create_app

    with pytest.raises(FileNotFoundError, match="saescope features"):
        create_app(tmp_path)


@pytest.mark.parametrize("method, url, body, status, says", [
    # ids: unknown, negative (no route matches), past the end, absurdly large
    ("get", "/api/sae/99/latent/0", None, 404, "no SAE"),
    ("get", "/api/sae/-1/latents", None, 404, ""),
    ("get", "/api/sae/1/latent/-1", None, 404, ""),
    ("get", "/api/sae/1/latent/64", None, 404, "out of range"),
    ("get", f"/api/sae/1/latent/{10**30}", None, 404, "out of range"),
    ("get", f"/api/sae/{10**30}/latents", None, 404, "no SAE"),
    # paging parameters
    ("get", "/api/sae/1/latents?offset=-5", None, 400, "offset"),
    ("get", "/api/sae/1/latents?limit=-1", None, 400, "limit"),
    ("get", "/api/sae/1/latents?limit=abc", None, 400, "whole number"),
    ("get", f"/api/sae/1/latents?offset={10**30}", None, 400, "offset"),
    # path traversal on the static routes
    ("get", "/static/../server.py", None, 404, ""),
    ("get", "/static/%2e%2e/server.py", None, 404, ""),
    ("get", "/static/..%2fserver.py", None, 404, ""),
    ("get", "/static//etc/passwd", None, 404, ""),
    ("get", "/static/%2fetc%2fpasswd", None, 404, ""),
    # search strings shaped like SQL injection are only text; an essay is refused
    ("get", "/api/sae/1/search?token=' OR 1=1 --", None, 200, None),
    ("get", "/api/sae/1/search?token=x'); DROP TABLE latents; --", None, 200, None),
    ("get", "/api/sae/1/search?token=%25", None, 200, None),
    ("get", "/api/sae/1/search?token=" + "a" * 5000, None, 400, "too long"),
    # the live box: malformed, mistyped or huge bodies
    ("post", "/api/sae/1/live", b"{not json", 400, "JSON object"),
    ("post", "/api/sae/1/live", b"[1, 2]", 400, "JSON object"),
    ("post", "/api/sae/1/live", b'"Paris"', 400, "JSON object"),
    ("post", "/api/sae/1/live", {"text": 12}, 400, "must be a string"),
    ("post", "/api/sae/1/live", {"text": ["Paris"]}, 400, "must be a string"),
    ("post", "/api/sae/1/live", {"text": None}, 400, "must be a string"),
    ("post", "/api/sae/1/live", {"text": "Paris " * 2000}, 413, "too long"),
    ("post", "/api/sae/1/live", b'{"text": "' + b"x" * 100_000 + b'"}', 413, ""),
    ("post", "/api/sae/1/live", {"text": "Paris", "latent": "abc"}, 400, "whole number"),
    ("post", "/api/sae/1/live", {"text": "Paris", "latent": 1.5}, 400, "whole number"),
    ("post", "/api/sae/1/live", {"text": "Paris", "latent": True}, 400, "whole number"),
    ("post", "/api/sae/1/live", {"text": "Paris", "latent": -3}, 404, "out of range"),
    ("post", "/api/sae/1/live", {"text": "Paris", "latent": 10**30}, 404, "out of range"),
    ("post", "/api/sae/99/live", {"text": "Paris"}, 404, "no SAE"),
    ("get", "/api/sae/1/live", None, 405, ""),
])
def test_hostile_requests_get_a_4xx_json_error(client, method, url, body, status, says):
    kwargs = {"json": body} if isinstance(body, dict) else {"data": body, "content_type": "application/json"}
    r = getattr(client, method)(url, follow_redirects=True, **(kwargs if body is not None else {}))
    assert r.status_code == status, (url, r.status_code, r.get_data(as_text=True)[:300])
    if status >= 400:
        assert r.is_json and says in r.get_json()["error"], r.get_data(as_text=True)[:300]
    else:
        assert r.get_json() == []  # the injection matched no token: it was only ever a string
    # the server is still whole afterwards: the tables an injection might drop still answer
    assert client.get("/api/sae/1/latent/0").status_code == 200


def test_database_path_with_hash_or_question_mark_opens_that_file_read_only(client, tmp_path):
    """Unquoted, ``file:{path}?mode=ro`` was cut at '#' or '?': SQLite opened another file (or
    created an empty one there) and read-only mode was lost."""
    import shutil
    import sqlite3

    from saescope.features.server import create_app
    from saescope.features.store import FeatureStore

    source = client.application.config["store"].path
    for name in ("run#2", "run?mode=rwc", "a b%20#c?d"):
        folder = tmp_path / name / "features"
        folder.mkdir(parents=True)
        shutil.copy(source, folder / "features.sqlite")
        store = FeatureStore(tmp_path / name)
        assert store.path == folder / "features.sqlite" and store.meta["model"] == "tiny"
        assert len(store.saes()) == 3
        with store._connect() as db, pytest.raises(sqlite3.OperationalError, match="readonly"):
            db.execute("DELETE FROM latents")
        assert create_app(tmp_path / name).test_client().get("/api/sae/1/latent/0").status_code == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run#2", "run?mode=rwc", "a b%20#c?d"])  # no strays


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    from saescope.features.store import FeatureStore

    (tmp_path / "features.sqlite").write_bytes(b"\x00\x01 not sqlite" * 100)
    with pytest.raises(ValueError, match="not a saescope feature database"):
        FeatureStore(tmp_path)
