"""Byte-level tokens are shown as the characters they spell, one entry per real token kept."""

from __future__ import annotations

import pytest

from saescope.features.token_text import display_texts, token_bytes

R = "\ufffd"


def test_runs_of_byte_tokens_are_joined_on_their_first_token():
    texts = ["6", ",", "000", R, R, R, "!"]
    raw = [b"6", b",", b"000", b"\xe2", b"\x82", b"\xac", b"!"]
    assert display_texts(texts, raw) == ["6", ",", "000", "€", "", "", "!"]


def test_what_cannot_be_joined_is_left_alone():
    assert display_texts(["a", R, "b"], [b"a", b"\xe2", b"b"]) == ["a", R, "b"]  # a truncated character
    assert display_texts([R, R], [None, b"\x82"]) == [R, R]  # bytes unknown
    assert display_texts(["x"], [None]) == ["x"]


def test_gpt2_style_byte_level_pieces():
    """Byte-level BPE spells bytes as printable characters (GPT-2's map): 'â', '¤' → b'\\xe2\\x82'."""

    class ByteLevel:
        pieces = {0: "Ġ6", 1: "âĤ", 2: "¬"}

        def convert_ids_to_tokens(self, ids):
            return [self.pieces[i] for i in ids]

        def decode(self, ids):
            return {0: " 6", 1: R, 2: R}[ids[0]]

    tok = ByteLevel()
    raw = token_bytes(tok, [0, 1, 2])
    assert raw == [b" 6", b"\xe2\x82", b"\xac"]
    assert display_texts([" 6", R, R], raw) == [" 6", "€", ""]


def test_gemma_byte_fallback_for_real():
    from saescope.models import resolve_model

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model("gemma-3-270m")[0])
    except Exception as err:  # the embedded model is installed by scripts/install.sh
        pytest.skip(f"Gemma 3 270M's tokenizer is not installed here ({err})")
    ids = tok("6,000€ and 𓀀 ꙮ")["input_ids"]
    texts = [tok.decode([i]) for i in ids]
    assert R in "".join(texts)  # the rare characters do fall back to bytes
    shown = display_texts(texts, token_bytes(tok, ids))
    assert len(shown) == len(ids) and R not in "".join(shown)
    assert "".join(shown[1:]) == "6,000€ and 𓀀 ꙮ"
