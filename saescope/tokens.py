"""Tokens: corpus readers and packing into fixed-length sequences.

(Interface fixed; implementation in progress.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TokenizedCorpus:
    """Packed fixed-length sequences, with per-token provenance.

    Every array is (N sequences, T positions).  Each sequence starts with BOS; documents are
    packed back to back, separated by EOS.
    """

    input_ids: np.ndarray  # (N, T) int64
    doc_ids: np.ndarray  # (N, T) int64: index of the source document, -1 at BOS/padding
    subset_ids: np.ndarray  # (N, T) int16: index into `subsets`, -1 at BOS/padding
    keep_mask: np.ndarray  # (N, T) bool: False at BOS, EOS and padding (never stored/evaluated)
    subsets: list[str]  # subset names, e.g. wiki-vital topics
    name: str  # corpus name as given

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        """Tokens that count (keep_mask True)."""
        return int(self.keep_mask.sum())


def load_corpus(
    name: str,
    tokenizer,
    *,
    seq_len: int = 1024,
    max_tokens: int | None = None,
    split: str = "train",
    heldout_fraction: float = 0.05,
    seed: int = 0,
) -> TokenizedCorpus:
    """Read a corpus by name or path, tokenize, pack.  ``split`` is "train" or "heldout"
    (a deterministic, document-level split).  ``max_tokens`` caps the kept tokens."""
    raise NotImplementedError
