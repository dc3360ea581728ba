"""Tokenization figures: tokens, documents and seconds per corpus with the Gemma 3 270M tokenizer.

    python benchmarks/tokens.py [--corpus wiki-vital --corpus python-docs ...]

Prints one line per (corpus, split): kept tokens, sequences of 1,024, documents, subsets, wall
time and kept tokens per second (reading + hashing + shuffling + tokenizing + packing).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", action="append", help="corpus names (default: wiki-vital, python-docs)")
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from saescope.defaults import gemma_270m_folder
    from saescope.tokens import load_corpus

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gemma_270m_folder()))
    print(f"tokenizer load: {time.perf_counter() - t0:.2f} s")
    for name in args.corpus or ["wiki-vital", "python-docs", "wiki-vital+python-docs"]:
        for split in ("train", "heldout"):
            t0 = time.perf_counter()
            corpus = load_corpus(name, tokenizer, seq_len=args.seq_len, split=split)
            seconds = time.perf_counter() - t0
            print(
                f"{name:24s} {split:8s} {corpus.n_tokens:>10,d} kept tokens  {len(corpus):>5d} seqs  "
                f"{corpus.n_documents:>6d} docs  {len(corpus.subsets):>3d} subsets  {seconds:6.2f} s  "
                f"{corpus.n_tokens / seconds:>10,.0f} tok/s"
            )


if __name__ == "__main__":
    main()
