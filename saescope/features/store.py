"""The feature database: one SQLite file per run, ``<run>/features/features.sqlite``.

SQLite because it is one self-describing file, in Python's standard library, readable from any
language (``sqlite3 features.sqlite``), and answers "latent 1234 of SAE 7" from an index in
well under a millisecond, which is what lets the browser stay fast on 54 SAEs x 4,096 latents.

Schema (version 1).  JSON columns hold plain lists; BLOB columns hold little-endian arrays.

``meta(key TEXT PRIMARY KEY, value TEXT)``
    JSON values: ``format_version`` (1), ``model`` (name to reload it for the live text box),
    ``corpus``, ``n_tokens`` (tokens that counted), ``seq_len``, ``window`` ([before, after]),
    ``release_root`` (the release folder, relative to this file's folder), ``config``.
``saes(sae INTEGER PRIMARY KEY, name TEXT UNIQUE, site TEXT, kind TEXT, layer INTEGER,
d_sae INTEGER, release_path TEXT, info TEXT)``
    ``name`` is the SAE's path under the release root (``resid_post/layer_3/width_4k/average_l0_52``);
    ``release_path`` is its folder relative to this file's folder (NULL if it had none);
    ``info`` is JSON: ``average_l0`` measured here, ``dead`` latents, ``density_hist`` (counts of
    latents per log10-frequency bin, edges ``density_edges``).
``latents(sae, latent, n_fired, frequency, max_act, mean_act, hist_max, histogram,
top_logits, bottom_logits)``, primary key (sae, latent)
    ``frequency`` = n_fired / n_tokens; ``mean_act`` is over firing tokens; ``histogram`` is a
    JSON list of counts over equal bins of [0, ``hist_max``]; ``top_logits``/``bottom_logits``
    are JSON ``[[token_id, effect], ...]`` (direct logit effect, see ``logits.py``).
``contexts(sae, latent, kind, rank, act, seq, pos, start, focus, acts)``, primary key
(sae, latent, kind, rank)
    ``kind`` is ``top`` (the top-k, rank 0 = largest) or ``q<j>`` (a uniform sample of the
    firing events whose activation lies in octave j below the latent's range [lo, hi], see
    ``sample_ranges`` in the card); ``seq``/``pos`` locate the activating token in the corpus's
    packed sequences; the window is the ``n = len(acts) / 2`` tokens of sequence ``seq`` from
    position ``start`` (cut at document boundaries), ``acts`` (float16 BLOB) the latent's
    activation on each of them, ``focus`` (= pos - start) the activating token's index in it.
``sequences(seq INTEGER PRIMARY KEY, tokens BLOB)``
    The token ids (int32 BLOB) of every packed sequence a context points into, stored once:
    a window's ids are ``substr(tokens, 4 * start + 1, 4 * n)``.
``token_latents(sae, token, rank, latent, max_act)``, primary key (sae, token, rank)
    For each corpus token id, the latents with the largest activation on it (rank 0 first).
``vocab(token INTEGER PRIMARY KEY, text TEXT)``
    The decoded text of every token id the other tables mention.
``vocab_bytes(token INTEGER PRIMARY KEY, bytes BLOB)``
    The bytes each of those tokens stands for (NULL where the tokenizer does not tell): the
    browser joins byte-level tokens into the characters they spell
    (:mod:`saescope.features.token_text`).  Absent in databases written before it.

The file is written under a temporary name and renamed into place when complete, beside
``features.sqlite.sha256`` (``sha256sum`` format): :class:`FeatureStore` checks it on opening, so
a damaged or half-copied database is refused by name instead of serving wrong cards.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saescope.errors import IntegrityError
from saescope.features.token_text import display_texts

FORMAT_VERSION = 1
DB_NAME = "features.sqlite"
CHECKSUM_SUFFIX = ".sha256"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE saes (sae INTEGER PRIMARY KEY, name TEXT UNIQUE, site TEXT, kind TEXT, layer INTEGER,
                   d_sae INTEGER, release_path TEXT, info TEXT);
CREATE TABLE latents (sae INTEGER, latent INTEGER, n_fired INTEGER, frequency REAL, max_act REAL,
                      mean_act REAL, hist_max REAL, histogram TEXT, top_logits TEXT, bottom_logits TEXT,
                      PRIMARY KEY (sae, latent)) WITHOUT ROWID;
CREATE TABLE contexts (sae INTEGER, latent INTEGER, kind TEXT, rank INTEGER, act REAL, seq INTEGER,
                       pos INTEGER, start INTEGER, focus INTEGER, acts BLOB,
                       PRIMARY KEY (sae, latent, kind, rank)) WITHOUT ROWID;
CREATE TABLE token_latents (sae INTEGER, token INTEGER, rank INTEGER, latent INTEGER, max_act REAL,
                            PRIMARY KEY (sae, token, rank)) WITHOUT ROWID;
CREATE TABLE sequences (seq INTEGER PRIMARY KEY, tokens BLOB);
CREATE TABLE vocab (token INTEGER PRIMARY KEY, text TEXT);
CREATE TABLE vocab_bytes (token INTEGER PRIMARY KEY, bytes BLOB);
"""


class FeatureWriter:
    """Writes a feature database; ``close()`` renames it into place."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):  # a killed writer's (the
            stale.unlink(missing_ok=True)  # caller holds the folder's lock: no live one owns them)
        self.db = sqlite3.connect(self.tmp)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SCHEMA)
        self.token_ids: set[int] = set()
        self.seqs: set[int] = set()

    def set_meta(self, **values: Any) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()])

    def add_sae(self, name: str, site, d_sae: int, release_path: str | None, info: dict) -> int:
        cur = self.db.execute(
            "INSERT INTO saes (name, site, kind, layer, d_sae, release_path, info) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, site.name, site.kind, site.layer, d_sae, release_path, json.dumps(info)),
        )
        return int(cur.lastrowid)

    def add_latents(self, rows: Iterable[tuple]) -> None:
        """Rows ``(sae, latent, n_fired, frequency, max_act, mean_act, hist_max, histogram,
        top_logits, bottom_logits)`` with the last three as Python lists."""
        out = []
        for row in rows:
            for pair_list in row[8:10]:
                self.token_ids.update(t for t, _ in pair_list)
            out.append((*row[:7], json.dumps(row[7]), json.dumps(row[8]), json.dumps(row[9])))
        self.db.executemany("INSERT INTO latents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", out)

    def add_contexts(self, rows: Iterable[tuple]) -> None:
        """Rows ``(sae, latent, kind, rank, act, seq, pos, start, focus, acts float array)``."""
        out = []
        for *head, acts in rows:
            self.seqs.add(head[5])
            out.append((*head, np.asarray(acts, dtype="<f2").tobytes()))
        self.db.executemany("INSERT INTO contexts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", out)

    def add_token_latents(self, rows: Iterable[tuple[int, int, int, int, float]]) -> None:
        rows = list(rows)
        self.token_ids.update(r[1] for r in rows)
        self.db.executemany("INSERT INTO token_latents VALUES (?, ?, ?, ?, ?)", rows)

    def add_sequences(self, input_ids: np.ndarray) -> None:
        """Store the rows of ``input_ids`` (N, T) that the contexts written so far point into."""
        rows = [(s, np.asarray(input_ids[s], dtype="<i4").tobytes()) for s in sorted(self.seqs)]
        for s in self.seqs:
            self.token_ids.update(int(t) for t in input_ids[s])
        self.db.executemany("INSERT OR REPLACE INTO sequences VALUES (?, ?)", rows)

    def add_vocab(self, decode, raw=None) -> None:
        """Store ``decode(token_ids) -> [str]`` for every token id written so far, and, given
        ``raw(token_ids) -> [bytes | None]``, the bytes each token stands for."""
        ids = sorted(self.token_ids)
        self.db.executemany("INSERT OR REPLACE INTO vocab VALUES (?, ?)", zip(ids, decode(ids)))
        if raw is not None:
            self.db.executemany("INSERT OR REPLACE INTO vocab_bytes VALUES (?, ?)", zip(ids, raw(ids)))

    def close(self) -> Path:
        self.db.execute("CREATE INDEX vocab_by_text ON vocab (text)")
        self.db.commit()
        self.db.close()
        from saescope.activations.store import sha256_file, write_atomic

        write_atomic(checksum_path(self.path), f"{sha256_file(self.tmp)}  {self.path.name}\n".encode())
        os.replace(self.tmp, self.path)
        return self.path


def checksum_path(db: Path) -> Path:
    return db.with_name(db.name + CHECKSUM_SUFFIX)


def verify_database(path: Path) -> None:
    """Check a feature database against its ``.sha256`` file (absent for files made before it)."""
    from saescope.activations.store import sha256_file

    sums = checksum_path(path)
    if not sums.is_file():
        return
    digest = sums.read_text(errors="replace").partition(" ")[0]
    if sha256_file(path) != digest:
        raise IntegrityError(f"feature database {path} is damaged (its SHA-256 does not match {sums}); "
                             "rerun `saescope features` (or `saescope run`) to write it again")


class FeatureStore:
    """Read-only access to a feature database, shaped for the browser's JSON API.

    Opens one connection per call so the object can be shared across server threads.
    """

    def __init__(self, path: Path | str):
        path = Path(path)
        if path.is_dir():
            for candidate in (path / DB_NAME, path / "features" / DB_NAME):
                if candidate.exists():
                    path = candidate
                    break
        if not path.is_file():
            raise FileNotFoundError(
                f"no feature database at {path}: run `saescope features --release RUN/release` first"
            )
        self.path = path
        # A URI, so read-only mode holds; quoted, so a '#' or '?' in the path is part of the name
        # (unquoted, SQLite cut the path there: another file was opened, or an empty one created).
        self.uri = path.resolve().as_uri() + "?mode=ro"
        verify_database(path)
        try:
            with self._connect() as db:
                self.meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        except (sqlite3.DatabaseError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a saescope feature database ({err}): rerun `saescope features`") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has feature format {self.meta.get('format_version')}, expected {FORMAT_VERSION}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection, closed on exit (sqlite3's own ``with`` only commits)."""
        db = sqlite3.connect(self.uri, uri=True)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    def saes(self) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM saes ORDER BY layer, kind, name").fetchall()
        # sqlite3.Row iterates over values, so .keys() is needed here
        return [{**{k: r[k] for k in r.keys() if k != "info"}, **json.loads(r["info"])} for r in rows]  # noqa: SIM118

    def sae(self, sae: int) -> dict:
        for row in self.saes():
            if row["sae"] == sae:
                return row
        raise KeyError(f"no SAE with id {sae}")

    def text(self, db: sqlite3.Connection, ids: Iterable[int], table: str = "vocab") -> dict[int, str]:
        ids = sorted({int(i) for i in ids})
        found: dict = {}
        column = "bytes" if table == "vocab_bytes" else "text"
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            q = f"SELECT token, {column} FROM {table} WHERE token IN ({','.join('?' * len(part))})"
            found.update(db.execute(q, part).fetchall())
        return found

    def token_bytes(self, db: sqlite3.Connection, ids: Iterable[int]) -> dict[int, bytes | None]:
        """Each token's bytes ({} for databases written before ``vocab_bytes`` existed)."""
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='vocab_bytes'").fetchone():
            return {}
        return self.text(db, ids, "vocab_bytes")

    def latent(self, sae: int, latent: int, raw_tokens: bool = False) -> dict | None:
        """A latent's card: statistics, histogram, logit effects and contexts with their text
        (byte-level tokens joined for display; ``raw_tokens`` adds ``tokens_raw``, each token's
        own text, for exports)."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM latents WHERE sae=? AND latent=?", (sae, latent)).fetchone()
            if row is None:
                return None
            ctx = db.execute(
                "SELECT kind, rank, act, c.seq, pos, focus, acts, "
                "substr(s.tokens, 4 * start + 1, 2 * length(acts)) AS tokens "
                "FROM contexts c JOIN sequences s ON s.seq = c.seq "
                "WHERE sae=? AND latent=? ORDER BY kind != 'top', kind, rank",
                (sae, latent),
            ).fetchall()
            top, bottom = json.loads(row["top_logits"]), json.loads(row["bottom_logits"])
            contexts = [
                {
                    "kind": c["kind"], "rank": c["rank"], "act": c["act"], "seq": c["seq"], "pos": c["pos"],
                    "focus": c["focus"],
                    "tokens": np.frombuffer(c["tokens"], dtype="<i4").tolist(),
                    "acts": [round(float(a), 4) for a in np.frombuffer(c["acts"], dtype="<f2")],
                }
                for c in ctx
            ]
            ids = [t for t, _ in top + bottom] + [t for c in contexts for t in c["tokens"]]
            text = self.text(db, ids)
            raw = self.token_bytes(db, ids)
        for c in contexts:
            tokens = c.pop("tokens")
            own = [text.get(t, f"<{t}>") for t in tokens]
            c["text"] = display_texts(own, [raw.get(t) for t in tokens])
            if raw_tokens:
                c["tokens_raw"] = own
        card = {k: row[k] for k in ("sae", "latent", "n_fired", "frequency", "max_act", "mean_act", "hist_max")}
        card["histogram"] = json.loads(row["histogram"])
        card["top_logits"] = [[text.get(t, f"<{t}>"), v] for t, v in top]
        card["bottom_logits"] = [[text.get(t, f"<{t}>"), v] for t, v in bottom]
        card["contexts"] = contexts
        card["n_octaves"] = self.meta["config"]["n_octaves"]
        card["hist_bins"] = self.meta["config"]["hist_bins"]
        return card

    def latent_list(self, sae: int, order: str = "latent", offset: int = 0, limit: int = 100) -> list[dict]:
        """A page of latent summaries; ``order`` is latent, frequency or max_act (descending)."""
        column = {"latent": "latent", "frequency": "frequency DESC", "max_act": "max_act DESC"}.get(order)
        if column is None:
            raise ValueError(f"unknown order {order!r}: use latent, frequency or max_act")
        with self._connect() as db:
            rows = db.execute(
                f"SELECT latent, frequency, max_act, top_logits FROM latents WHERE sae=? "
                f"ORDER BY {column} LIMIT ? OFFSET ?",
                (sae, limit, offset),
            ).fetchall()
            first = {r["latent"]: (json.loads(r["top_logits"]) or [[None, 0]])[0][0] for r in rows}
            text = self.text(db, [t for t in first.values() if t is not None])
        return [
            {"latent": r["latent"], "frequency": r["frequency"], "max_act": r["max_act"],
             "top_token": text.get(first[r["latent"]], "")}
            for r in rows
        ]

    def search_token(self, sae: int, query: str, limit: int = 30) -> list[dict]:
        """Latents that fire hardest on tokens whose text matches ``query``.

        Exact text first (``' Paris'``), then the same with surrounding spaces ignored
        (``Paris`` finds ``' Paris'`` and ``'Paris'``), case-insensitively.
        """
        q = query.strip().lower()
        if not q:
            return []
        with self._connect() as db:
            tokens = {
                t: s for t, s in db.execute("SELECT token, text FROM vocab WHERE lower(trim(text)) = ?", (q,))
            }
            if not tokens:
                return []
            marks = ",".join("?" * len(tokens))
            rows = db.execute(
                f"SELECT t.token, t.latent, t.max_act, l.max_act AS latent_max, l.frequency FROM token_latents t "
                f"JOIN latents l ON l.sae = t.sae AND l.latent = t.latent "
                f"WHERE t.sae=? AND t.token IN ({marks})",
                (sae, *tokens),
            ).fetchall()
        best: dict[int, dict] = {}
        for r in rows:
            rel = r["max_act"] / r["latent_max"] if r["latent_max"] else 0.0
            if r["latent"] not in best or rel > best[r["latent"]]["relative"]:
                best[r["latent"]] = {
                    "latent": r["latent"], "token": tokens[r["token"]], "act": r["max_act"],
                    "relative": rel, "frequency": r["frequency"],
                }
        return sorted(best.values(), key=lambda d: -d["relative"])[:limit]
