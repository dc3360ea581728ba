"""The feature browser: a small Flask app over a feature database, plus a live text box.

Pages stay fast at 54 SAEs x 4,096 latents because nothing big is ever sent: the page is one
static HTML/JS file, and it fetches small JSON documents on demand: the SAE list once, then one
latent card (a few kilobytes, two indexed SQLite lookups) per click.

JSON API (all GET unless noted):

``/api/meta``                          run metadata and the list of SAEs
``/api/sae/<sae>/latents``             a page of latent summaries (``order``, ``offset``, ``limit``)
``/api/sae/<sae>/latent/<latent>``     a latent's card (see :meth:`FeatureStore.latent`)
``/api/sae/<sae>/search?token=Paris``  latents that fire hardest on that token
``/api/sae/<sae>/live`` (POST)         ``{"text": ..., "latent": optional}``: runs the model on the
                                       text and returns, per token, the SAE's strongest latents

Every bad request (unknown or out-of-range ids, malformed or oversized JSON, a text that is not a
string, a search string past :data:`SEARCH_MAX_CHARS`, a path outside ``static/``) is answered
with a 4xx ``{"error": ...}``; queries are parameterised, so a search string is only ever text.

The model for the live box is loaded once, on first use, by name from the database's metadata
(``saescope.models.load_model``); SAEs come from their release folders
(``saescope.release.load_sae``).  Both loaders can be replaced (tests pass tiny in-memory ones).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from saescope.features.store import FeatureStore
from saescope.features.token_text import display_texts, token_bytes

STATIC = Path(__file__).parent / "static"
LIVE_MAX_TOKENS = 256
#: the live box reads at most this many characters (the model sees LIVE_MAX_TOKENS tokens anyway)
LIVE_MAX_CHARS = 4096
SEARCH_MAX_CHARS = 200
#: request bodies past this are refused (413) before they are read
MAX_BODY_BYTES = 64 * 1024
PAGE_MAX = 500


class LiveModel:
    """The model, tokenizer and SAEs behind the live text box, loaded lazily, used one at a time."""

    def __init__(self, store: FeatureStore, load_model: Callable | None = None, load_sae: Callable | None = None):
        self.store = store
        self._load_model = load_model or self._default_model
        self._load_sae = load_sae or self._default_sae
        self._model = None
        self._saes: dict[int, object] = {}
        self.lock = threading.Lock()

    def _default_model(self):
        from saescope.models import load_model

        name = self.store.meta.get("model")
        if not name:
            raise RuntimeError("this feature database does not name its model; rerun `saescope features --model NAME`")
        return load_model(name)

    def _default_sae(self, row: dict):
        from saescope.release.load import load_sae

        if not row.get("release_path"):
            raise RuntimeError(f"SAE {row['name']} has no release folder recorded, so it cannot run live")
        return load_sae(self.store.path.parent / row["release_path"])

    def run(self, sae_id: int, text: str, latent: int | None = None, top: int = 8) -> dict:
        import torch

        from saescope.sites import Site, capture, io_sites

        from saescope.sites import check_sae_fits

        row = self.store.sae(sae_id)
        site = Site.parse(row["site"])
        with self.lock:
            if self._model is None:
                self._model = self._load_model()
            model, tokenizer = self._model
            if sae_id not in self._saes:
                sae = self._load_sae(row)
                check_sae_fits(model, site, sae, row["name"])
                self._saes[sae_id] = sae
            sae = self._saes[sae_id]
            device = next(model.parameters()).device
            sae.to(device)
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :LIVE_MAX_TOKENS].to(device)
            with torch.no_grad():
                x_site = io_sites(site)[0]  # a transcoder reads its mlp_in
                x_TD = capture(model, [x_site], ids)[x_site][0]
                f_TF = sae.encode(x_TD.to(sae.W_enc.dtype)).float()
            vals, lats = f_TF.topk(min(top, f_TF.shape[1]), dim=1)
            id_list = ids[0].tolist()
            texts = display_texts([tokenizer.decode([i]) for i in id_list], token_bytes(tokenizer, id_list))
        tokens = []
        for t, (v_K, l_K) in enumerate(zip(vals.cpu().tolist(), lats.cpu().tolist())):
            tokens.append({
                "text": texts[t],
                "latents": [[l, round(v, 4)] for l, v in zip(l_K, v_K) if v > 0],
                "act": round(float(f_TF[t, latent]), 4) if latent is not None else None,
            })
        return {"tokens": tokens, "latent": latent}


def create_app(path: Path | str, *, load_model: Callable | None = None, load_sae: Callable | None = None):
    """A Flask app serving the feature database at ``path`` (a run directory, its features
    folder, or the ``features.sqlite`` file)."""
    from flask import Flask, abort, jsonify, request, send_from_directory
    from werkzeug.exceptions import HTTPException

    store = FeatureStore(path)
    live = LiveModel(store, load_model, load_sae)
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config["store"] = store
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    n_saes = {row["sae"]: row["d_sae"] for row in store.saes()}

    def check(sae: int, latent: int | None = None) -> None:
        if sae not in n_saes:
            abort(404, f"no SAE with id {sae}")
        if latent is not None and not 0 <= latent < n_saes[sae]:
            abort(404, f"latent {latent} out of range: this SAE has {n_saes[sae]} latents (0..{n_saes[sae] - 1})")

    def whole(name: str, default: int, low: int, high: int) -> int:
        """A query parameter as an int in [low, high], or a 400 naming it."""
        text = request.args.get(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            abort(400, f"{name} must be a whole number, got {text[:40]!r}")
        if not low <= value <= high:
            abort(400, f"{name} must lie in [{low}, {high}], got {value}")
        return value

    @app.errorhandler(HTTPException)
    def json_error(err):
        return jsonify(error=err.description), err.code

    @app.errorhandler(Exception)
    def unexpected(err):  # a bug: the page gets JSON and the server keeps running
        app.logger.exception("unexpected error")
        return jsonify(error=f"internal error ({type(err).__name__}); see the server's log"), 500

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/api/meta")
    def meta():
        keys = ("model", "corpus", "n_tokens", "seq_len", "window")
        return jsonify(meta={k: store.meta.get(k) for k in keys}, saes=store.saes())

    @app.get("/api/sae/<int:sae>/latents")
    def latents(sae: int):
        check(sae)
        offset = whole("offset", 0, 0, n_saes[sae])
        limit = whole("limit", 50, 1, 2**31)
        try:
            rows = store.latent_list(sae, request.args.get("order", "latent"), offset, min(limit, PAGE_MAX))
        except ValueError as err:
            abort(400, str(err))
        return jsonify(rows)

    @app.get("/api/sae/<int:sae>/latent/<int:latent>")
    def latent(sae: int, latent: int):
        check(sae, latent)
        return jsonify(store.latent(sae, latent))

    @app.get("/api/sae/<int:sae>/search")
    def search(sae: int):
        check(sae)
        token = request.args.get("token", "")
        if len(token) > SEARCH_MAX_CHARS:
            abort(400, f"search text too long ({len(token)} characters; at most {SEARCH_MAX_CHARS})")
        return jsonify(store.search_token(sae, token))

    @app.post("/api/sae/<int:sae>/live")
    def run_live(sae: int):
        check(sae)
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400, 'the body must be a JSON object: {"text": "...", "latent": optional id}')
        text = body.get("text", "")
        if not isinstance(text, str):
            abort(400, f"text must be a string, got {type(text).__name__}")
        if len(text) > LIVE_MAX_CHARS:
            abort(413, f"text too long ({len(text)} characters; at most {LIVE_MAX_CHARS})")
        if not text.strip():
            abort(400, "type some text first")
        latent = body.get("latent")
        if latent is not None:
            if isinstance(latent, bool) or not isinstance(latent, int):
                abort(400, f"latent must be a whole number, got {latent!r:.40}")
            check(sae, latent)
        try:
            return jsonify(live.run(sae, text, latent))
        except (RuntimeError, FileNotFoundError, ValueError) as err:
            abort(400, f"live run failed: {err}")

    return app


def serve(path: Path | str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the browser until interrupted (Flask's threaded server: a local, one-user tool)."""
    app = create_app(path)
    print(f"saescope browse: serving {app.config['store'].path} at http://{host}:{port}/  (Ctrl-C to stop)")
    app.run(host=host, port=port, threaded=True, use_reloader=False)
