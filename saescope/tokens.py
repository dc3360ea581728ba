"""Tokens: tokenize a corpus and pack it into fixed-length sequences, keeping each token's origin.

One sequence of ``seq_len`` positions looks like::

    BOS a a a a EOS b b EOS c c c ...          (documents a, b, c packed back to back)
    BOS c c c c c c c c c c c c c ...          (c continues after a fresh BOS)
    BOS c c EOS d d d EOS PAD PAD PAD          (only the very last sequence is padded)

* Every sequence starts with BOS, as the model saw in training.  A tokenizer without a BOS token
  (Qwen2) starts sequences with its EOS token instead, the way such models separate documents.
* Each document is followed by EOS.  A document longer than the room left continues in the next
  sequence, after that sequence's own BOS: no position ever sees a sequence that does not start
  with BOS, whose activations are outliers (attention sink) the paper keeps out of training.
* The tail of the last sequence is padded with the pad id (EOS if the tokenizer has none) rather
  than dropped, so a small corpus or held-out split loses nothing.  Padding is on the right and
  attention is causal, so padding never changes a kept position: no attention mask is needed.
* ``keep_mask`` is False at BOS, EOS and padding (and wherever a document's own text produced the
  BOS or EOS id): the paper keeps activations only from the other tokens, and libraries that
  trained on BOS shipped broken features.  ``max_tokens`` counts kept tokens.
* The held-out split is by document: a document is held out when a hash of ``(seed, its text)``
  falls below ``heldout_fraction``.  Train and held-out never share a document (nor two copies of
  one text), whatever the order documents arrive in; use the same ``seed`` for both.
* ``doc_ids`` number documents in the order :func:`saescope.corpora.iter_documents` yields them
  (before the split), so ids are comparable across the train and held-out corpora of one
  ``(name, seed)``.  ``subset_ids`` index into ``subsets``, listed in order of first appearance;
  compare subsets across corpora by name.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np

from saescope.corpora import Document, iter_documents

#: text tokenized per call: big enough for the fast tokenizers' batch parallelism, small enough
#: that a small ``max_tokens`` stops after a fraction of a second.
CHARS_PER_BATCH = 1_000_000
#: a tokenizer's ``model_max_length`` at or above this is transformers' "no limit" placeholder
_NO_LIMIT = 10**9


@dataclass
class TokenizedCorpus:
    """Packed fixed-length sequences, with per-token provenance.

    Every array is (N sequences, T positions).  Each sequence starts with BOS; documents are
    packed back to back, separated by EOS.
    """

    input_ids: np.ndarray  # (N, T) int64
    doc_ids: np.ndarray  # (N, T) int64: index of the source document, -1 at BOS/padding (EOS: its document)
    subset_ids: np.ndarray  # (N, T) int16: index into `subsets`, -1 at BOS/padding
    keep_mask: np.ndarray  # (N, T) bool: False at BOS, EOS and padding (never stored/evaluated)
    subsets: list[str]  # subset names, e.g. wiki-vital topics
    name: str  # corpus name as given
    split: str = "train"  # "train" or "heldout"

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_tokens(self) -> int:
        """Tokens that count (keep_mask True)."""
        return int(self.keep_mask.sum())

    @property
    def n_documents(self) -> int:
        """Distinct documents with at least one token here."""
        return int(np.unique(self.doc_ids[self.doc_ids >= 0]).size)

    def fingerprint(self) -> str:
        """The data's identity: SHA-256 (first 16 hex digits) of the packed ids' shape (so
        ``seq_len``), the ids and the keep mask.  What a store and a training run record, so a
        resume on other data is refused while two spellings of one corpus's path agree."""
        ids = np.ascontiguousarray(self.input_ids, dtype=np.int64)
        keep = np.ascontiguousarray(self.keep_mask, dtype=bool)
        h = hashlib.sha256()
        for chunk in (str(ids.shape).encode(), ids.tobytes(), keep.tobytes()):
            h.update(chunk)
        return h.hexdigest()[:16]

    def subset_token_counts(self) -> dict[str, int]:
        """Kept tokens per subset name."""
        counts = np.bincount(self.subset_ids[self.keep_mask].astype(np.int64), minlength=len(self.subsets))
        return {name: int(n) for name, n in zip(self.subsets, counts)}


def load_corpus(
    name: str,
    tokenizer,
    *,
    seq_len: int = 1024,
    max_tokens: int | None = None,
    split: str = "train",
    heldout_fraction: float = 0.05,
    seed: int = 0,
    max_context: int | None = None,
) -> TokenizedCorpus:
    """Read a corpus by name or path, tokenize, pack.  ``split`` is "train" or "heldout"
    (a deterministic, document-level split).  ``max_tokens`` caps the kept tokens.

    ``max_context`` is the model's context length (see :func:`model_context_length`); a
    ``seq_len`` beyond it, or beyond the tokenizer's ``model_max_length``, is refused.  Corpus
    names are those of :mod:`saescope.corpora`; reading stops as soon as ``max_tokens`` kept
    tokens are in, so a small budget on a big corpus is quick.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie strictly between 0 and 1, got {heldout_fraction}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (BOS plus at least one token), got {seq_len!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    _check_context(seq_len, tokenizer, max_context)
    bos, eos, pad = special_token_ids(tokenizer)

    docs = iter_documents(name, seed=seed)
    stream, subsets, n_read, n_split = _tokenize(docs, tokenizer, eos, split, heldout_fraction, seed, max_tokens)
    if n_read == 0:
        raise ValueError(f"corpus {name!r} is empty: it holds no non-empty documents")
    if n_split == 0 or not stream[3].any():
        raise ValueError(
            f"corpus {name!r} has no tokens in the {split!r} split ({n_read} documents read, "
            f"heldout_fraction={heldout_fraction}); the split is by document: give more documents "
            "(e.g. a folder of files or a .jsonl with one document per line)"
        )
    input_ids, doc_ids, subset_ids, keep = _pack(
        *stream, seq_len=seq_len, bos=bos, eos=eos, pad=pad, max_tokens=max_tokens
    )
    # The last batch may have read documents past the cut: list only subsets that made it in.
    present = np.flatnonzero(np.bincount(subset_ids[subset_ids >= 0], minlength=len(subsets)))
    remap = np.full(len(subsets) + 1, -1, np.int16)  # index -1 (BOS/padding) stays -1
    remap[present] = np.arange(present.size)
    subset_ids = remap[subset_ids]
    subsets = [subsets[i] for i in present]
    return TokenizedCorpus(input_ids, doc_ids, subset_ids, keep, subsets, name, split)


def special_token_ids(tokenizer) -> tuple[int, int, int]:
    """``(bos, eos, pad)`` ids: BOS falls back to EOS (Qwen2 has no BOS), pad falls back to EOS."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token: cannot mark sequence starts")
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: cannot separate packed documents")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(bos), int(eos), int(pad)


def model_context_length(model) -> int | None:
    """The longest sequence a model's position scheme covers, from its config (None if unknown)."""
    config = getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_heldout(text: str, seed: int, heldout_fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a uniform hash of ``(seed, text)``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=str(seed).encode()[:16]).digest()
    return int.from_bytes(digest, "big") < heldout_fraction * 2**64


def _check_context(seq_len: int, tokenizer, max_context: int | None) -> None:
    limits = []
    if max_context is not None:
        limits.append((max_context, "the model's context length"))
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _NO_LIMIT:
        limits.append((tokenizer_limit, "the tokenizer's model_max_length"))
    for limit, what in limits:
        if seq_len > limit:
            raise ValueError(f"seq_len {seq_len} is beyond {what} ({limit} tokens); use --seq-len {limit} or less")


def _tokenize(docs, tokenizer, eos: int, split: str, heldout_fraction: float, seed: int, max_tokens: int | None):
    """Tokenize the split's documents in batches until ``max_tokens`` content tokens are in.

    Returns flat arrays ``(ids, doc_ids, subset_ids, is_content)`` with an EOS after every
    document, the subset names, and the counts of documents read and kept in the split.
    """
    from tqdm.auto import tqdm

    want_heldout = split == "heldout"
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=f"tokenize ({split})", disable=None, leave=False)
    subset_index: dict[str, int] = {}
    chunks: list[tuple[np.ndarray, ...]] = []
    n_read = n_split = n_content = 0
    batch: list[tuple[int, Document]] = []
    batch_chars = 0
    for doc_index, doc in enumerate(docs):
        n_read += 1
        if is_heldout(doc.text, seed, heldout_fraction) != want_heldout:
            continue
        n_split += 1
        subset_index.setdefault(doc.subset, len(subset_index))
        batch.append((doc_index, doc))
        batch_chars += len(doc.text)
        # ~4 characters per token: a small budget tokenizes a little more text than it needs.
        budget_chars = CHARS_PER_BATCH if max_tokens is None else min(CHARS_PER_BATCH, 8 * (max_tokens - n_content))
        if batch_chars >= budget_chars:
            chunks.append(_tokenize_batch(batch, tokenizer, eos, subset_index))
            n_content += int(chunks[-1][3].sum())
            bar.update(int(chunks[-1][3].sum()))
            batch, batch_chars = [], 0
            if max_tokens is not None and n_content >= max_tokens:
                break
    if batch:
        chunks.append(_tokenize_batch(batch, tokenizer, eos, subset_index))
    bar.close()
    if not chunks:
        empty = np.zeros(0, np.int64)
        return (empty, empty, empty.astype(np.int16), empty.astype(bool)), list(subset_index), n_read, n_split
    stream = tuple(np.concatenate(parts) for parts in zip(*chunks))
    return stream, list(subset_index), n_read, n_split


def _tokenize_batch(batch, tokenizer, eos: int, subset_index: dict[str, int]) -> tuple[np.ndarray, ...]:
    """One fast batch call; text that spells a special token (say '<eos>') stays plain text."""
    texts = [doc.text for _, doc in batch]
    encoded = tokenizer(
        texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False, verbose=False
    )["input_ids"]
    lengths = np.array([len(ids) + 1 if ids else 0 for ids in encoded], dtype=np.int64)  # + EOS
    with_eos = itertools.chain.from_iterable((*ids, eos) for ids in encoded if ids)
    ids = np.fromiter(with_eos, np.int64, int(lengths.sum()))
    doc_ids = np.repeat(np.array([i for i, _ in batch], np.int64), lengths)
    subset_ids = np.repeat(np.array([subset_index[doc.subset] for _, doc in batch], np.int16), lengths)
    is_content = np.ones(ids.size, bool)
    is_content[np.cumsum(lengths[lengths > 0]) - 1] = False  # each document's closing EOS
    return ids, doc_ids, subset_ids, is_content


def _pack(ids, doc_ids, subset_ids, is_content, *, seq_len: int, bos: int, eos: int, pad: int, max_tokens):
    """Cut the flat stream into rows of ``seq_len - 1``, pad the last row, put BOS in front."""
    if max_tokens is not None:
        n_content = np.cumsum(is_content)
        if n_content[-1] > max_tokens:
            end = int(np.searchsorted(n_content, max_tokens)) + 1  # just after the last kept token
            ids, doc_ids, subset_ids, is_content = ids[:end], doc_ids[:end], subset_ids[:end], is_content[:end]
    body = seq_len - 1
    n_seqs = -(-ids.size // body)
    n_pad = n_seqs * body - ids.size

    def rows(flat: np.ndarray, fill, first) -> np.ndarray:
        padded = np.concatenate([flat, np.full(n_pad, fill, flat.dtype)]).reshape(n_seqs, body)
        return np.concatenate([np.full((n_seqs, 1), first, flat.dtype), padded], axis=1)

    input_ids = rows(ids, pad, bos)
    keep = rows(is_content, False, False) & (input_ids != bos) & (input_ids != eos)
    return input_ids, rows(doc_ids, -1, -1), rows(subset_ids, -1, -1), keep


def scored_positions(corpus: TokenizedCorpus) -> np.ndarray:
    """(N, T) bool: the positions whose next-token prediction is scored."""
    keep, doc = corpus.keep_mask, corpus.doc_ids
    scored = np.zeros_like(keep, dtype=bool)
    scored[:, :-1] = keep[:, :-1] & (doc[:, 1:] >= 0)
    return scored
