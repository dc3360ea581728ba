"""Readable token text for display: byte-level tokens joined into the characters they spell.

A tokenizer with byte fallback (Gemma's SentencePiece: ``<0xE2>`` pieces) or byte-level BPE
(GPT-2) splits a rare character over several tokens; each decoded alone is "�", so "6,000€"
showed as "6,000���".  :func:`display_texts` keeps one entry per real token (activations stay
per token) but puts a group's joined character on the group's first token and "" on the rest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
#: the longest UTF-8 sequence: a group never spans more tokens than this
_MAX_GROUP = 4


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character map, inverted (its BPE pieces spell bytes this way)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes | None]:
    """The bytes each token stands for, where they can be told (None where not)."""
    to_pieces = getattr(tokenizer, "convert_ids_to_tokens", None)  # duck-typed tokenizers may lack it
    pieces = to_pieces(list(ids)) if to_pieces is not None else [None] * len(ids)
    decoder = _byte_level_decoder()
    out: list[bytes | None] = []
    for i, piece in zip(ids, pieces):
        match = _BYTE_PIECE.match(piece or "")
        if match:
            out.append(bytes([int(match.group(1), 16)]))
            continue
        text = tokenizer.decode([i])
        if REPLACEMENT not in text:
            out.append(text.encode("utf-8"))
        elif piece and all(ch in decoder for ch in piece):
            out.append(bytes(decoder[ch] for ch in piece))
        else:
            out.append(None)
    return out


def display_texts(texts: Sequence[str], raw: Sequence[bytes | None]) -> list[str]:
    """``texts`` (one per token) with each run of tokens that spells a character only together
    joined: the character on the run's first token, "" on the others."""
    out = list(texts)
    i, n = 0, len(texts)
    while i < n:
        if REPLACEMENT not in texts[i] or raw[i] is None:
            i += 1
            continue
        acc = b""
        for j in range(i, min(n, i + _MAX_GROUP)):
            if raw[j] is None:
                break
            acc += raw[j]
            try:
                joined = acc.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if j > i:
                out[i : j + 1] = [joined] + [""] * (j - i)
                i = j
            break
        i += 1
    return out
