"""Packing: BOS first, EOS between documents, exact keep_mask, provenance, split, budget, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from saescope import tokens
from saescope.corpora import iter_documents
from saescope.tokens import load_corpus, model_context_length

PAD, EOS, BOS, UNK = 0, 1, 2, 3
N_WORDS = 500


def make_tokenizer(*, bos: bool = True, eos: bool = True, model_max_length: int | None = None):
    """A word-level tokenizer: 'w<k>' is token 4 + k, so every token says which word it is."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": UNK} | {f"w{k}": 4 + k for k in range(N_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"pad_token": "<pad>", "unk_token": "<unk>"}
    special |= {"bos_token": "<bos>"} if bos else {}
    special |= {"eos_token": "<eos>"} if eos else {}
    extra = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special, **extra)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_corpus(path, lengths, subsets=None):
    """Document k repeats the word 'w<k>' lengths[k] times."""
    lines = []
    for k, n in enumerate(lengths):
        record = {"text": " ".join([f"w{k}"] * n)}
        if subsets:
            record["subset"] = subsets[k]
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def doc_words(name, seed=0):
    """The word index behind each doc id (doc ids number documents in iteration order)."""
    return [int(doc.text.split()[0][1:]) for doc in iter_documents(name, seed=seed)]


def test_layout_bos_eos_padding_and_provenance(tmp_path, tok):
    lengths = [3, 11, 1, 6, 25, 2, 7]  # doc 4 spans several sequences of 8
    subsets = ["a", "b", "a", "c", "b", "a", "c"]
    name = write_corpus(tmp_path / "c.jsonl", lengths, subsets)
    corpus = load_corpus(name, tok, seq_len=8, heldout_fraction=1e-9)  # everything in train
    words = doc_words(name)
    assert corpus.input_ids.shape[1] == 8 and corpus.seq_len == 8 and corpus.split == "train"
    assert (corpus.input_ids[:, 0] == BOS).all()
    assert corpus.n_tokens == sum(lengths) and corpus.n_documents == len(lengths)

    # Reading the rows back (BOS stripped, padding dropped) gives each document then its EOS.
    body = corpus.input_ids[:, 1:].ravel()
    body_docs, body_subsets = corpus.doc_ids[:, 1:].ravel(), corpus.subset_ids[:, 1:].ravel()
    real = body != PAD
    expected = []
    for doc_id, word in enumerate(words):
        expected += [4 + word] * lengths[word] + [EOS]
    assert body[real].tolist() == expected
    # doc ids and subsets follow the tokens; EOS belongs to the document it closes.
    expected_docs = [d for d, w in enumerate(words) for _ in range(lengths[w] + 1)]
    assert body_docs[real].tolist() == expected_docs
    assert [corpus.subsets[s] for s in body_subsets[real]] == [subsets[words[d]] for d in expected_docs]
    # Padding only at the very end; BOS and padding carry no document or subset.
    n_real = int(real.sum())
    assert real[:n_real].all() and not real[n_real:].any()
    assert (corpus.doc_ids[:, 0] == -1).all() and (body_docs[~real] == -1).all() and (body_subsets[~real] == -1).all()
    # keep_mask is False exactly at BOS, EOS and padding.
    assert (corpus.keep_mask == ~np.isin(corpus.input_ids, [BOS, EOS, PAD])).all()
    assert corpus.subset_token_counts() == {s: sum(n for n, t in zip(lengths, subsets) if t == s) for s in "abc"}


def test_long_document_continues_after_a_new_bos(tmp_path, tok):
    name = write_corpus(tmp_path / "long.jsonl", [20])
    corpus = load_corpus(name, tok, seq_len=6, heldout_fraction=1e-9)
    assert corpus.input_ids.tolist() == [
        [BOS, 4, 4, 4, 4, 4], [BOS, 4, 4, 4, 4, 4], [BOS, 4, 4, 4, 4, 4], [BOS, 4, 4, 4, 4, 4],
        [BOS, EOS, PAD, PAD, PAD, PAD],
    ]  # fmt: skip
    assert (corpus.doc_ids[:4, 1:] == 0).all() and corpus.doc_ids[4, 1] == 0


def test_literal_special_token_in_text_is_not_kept(tmp_path, tok):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"text": "w1 <eos> w2 <bos> w3"}) + "\n")
    corpus = load_corpus(str(path), tok, seq_len=16, heldout_fraction=1e-9)
    assert corpus.input_ids[0, :7].tolist() == [BOS, 5, EOS, 6, BOS, 7, EOS]
    assert corpus.keep_mask[0, :7].tolist() == [False, True, False, True, False, True, False]
    assert corpus.doc_ids[0, 1:7].tolist() == [0] * 6


def test_split_is_disjoint_deterministic_and_by_document(tmp_path, tok):
    name = write_corpus(tmp_path / "many.jsonl", [5 + k % 7 for k in range(400)])
    train = load_corpus(name, tok, seq_len=32, heldout_fraction=0.25, split="train")
    held = load_corpus(name, tok, seq_len=32, heldout_fraction=0.25, split="heldout")
    train_docs, held_docs = set(np.unique(train.doc_ids[train.keep_mask])), set(np.unique(held.doc_ids[held.keep_mask]))
    assert not train_docs & held_docs
    assert train_docs | held_docs == set(range(400))
    assert 60 < len(held_docs) < 140  # about a quarter
    again = load_corpus(name, tok, seq_len=32, heldout_fraction=0.25, split="heldout")
    assert np.array_equal(again.input_ids, held.input_ids) and np.array_equal(again.doc_ids, held.doc_ids)
    # Held out by text, not position: the same documents whatever the seed's document order.
    words = doc_words(name, seed=0)
    held_words = {words[d] for d in held_docs}
    other_seed = load_corpus(name, tok, seq_len=32, heldout_fraction=0.25, split="heldout", seed=1)
    words1 = doc_words(name, seed=1)
    assert {words1[d] for d in np.unique(other_seed.doc_ids[other_seed.keep_mask])} != held_words  # seed changes it
    assert held_words == {k for k in range(400) if tokens.is_heldout(" ".join([f"w{k}"] * (5 + k % 7)), 0, 0.25)}


def test_max_tokens_caps_kept_tokens_and_stops_reading_early(tmp_path, tok, monkeypatch):
    name = write_corpus(tmp_path / "big.jsonl", [50] * 400)  # 20,000 tokens
    corpus = load_corpus(name, tok, seq_len=64, max_tokens=1000)
    assert corpus.n_tokens == 1000
    assert corpus.keep_mask[-1].any()  # no empty trailing sequence
    small = load_corpus(name, tok, seq_len=64, max_tokens=10**9, split="heldout")
    assert small.n_tokens == 50 * small.n_documents  # fewer than asked: everything there is

    tokenized_texts = []
    real_call = type(tok).__call__

    def counting_call(self, texts, **kwargs):
        tokenized_texts.extend(texts)
        return real_call(self, texts, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting_call)
    monkeypatch.setattr(tokens, "CHARS_PER_BATCH", 2000)
    load_corpus(name, tok, seq_len=64, max_tokens=300)
    assert 6 <= len(tokenized_texts) < 40  # a few documents tokenized, not 400


def test_subsets_list_only_what_made_it_in(tmp_path, tok):
    name = write_corpus(tmp_path / "s.jsonl", [10] * 40, subsets=[f"s{k % 4}" for k in range(40)])
    corpus = load_corpus(name, tok, seq_len=16, max_tokens=15)
    assert sum(corpus.subset_token_counts().values()) == 15
    assert all(n > 0 for n in corpus.subset_token_counts().values())
    assert set(corpus.subset_ids[corpus.keep_mask]) == set(range(len(corpus.subsets)))


def test_join_keeps_both_corpora_under_a_small_budget(tmp_path, tok):
    a = write_corpus(tmp_path / "a.jsonl", [30] * 100)
    b = write_corpus(tmp_path / "b.jsonl", [30] * 100)
    counts = load_corpus(f"{a}+{b}", tok, seq_len=64, max_tokens=1200).subset_token_counts()
    assert set(counts) == {"a", "b"} and min(counts.values()) >= 500


def test_wiki_vital_topics_become_subsets(tok):
    corpus = load_corpus("wiki-vital", tok, seq_len=256, max_tokens=30_000)
    assert corpus.n_tokens == 30_000
    assert {"People", "Geography", "Biology and health sciences", "Arts", "History"} <= set(corpus.subsets)
    assert set(corpus.subsets) <= {
        "People", "Biology and health sciences", "Geography", "Uncategorized", "Physical sciences",
        "Society and social sciences", "Arts", "Technology", "History", "Everyday life",
        "Philosophy and religion", "Mathematics",
    }  # fmt: skip


def test_tokenizer_without_bos_starts_sequences_with_eos(tmp_path):
    name = write_corpus(tmp_path / "c.jsonl", [3, 3])
    corpus = load_corpus(name, make_tokenizer(bos=False), seq_len=16, heldout_fraction=1e-9)
    assert corpus.input_ids[0, 0] == EOS and not corpus.keep_mask[0, 0]
    assert corpus.n_tokens == 6
    with pytest.raises(ValueError, match="no EOS token"):
        load_corpus(name, make_tokenizer(eos=False), seq_len=16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 4096, "max_context": 2048}, r"seq_len 4096 is beyond the model's context length \(2048"),
        ({"seq_len": 1}, "seq_len must be an integer >= 2"),
        ({"split": "test"}, "split must be 'train' or 'heldout'"),
        ({"heldout_fraction": 0.0}, "heldout_fraction must lie strictly between 0 and 1"),
        ({"max_tokens": 0}, "max_tokens must be positive"),
    ],
)
def test_bad_arguments(tmp_path, tok, kwargs, message):
    name = write_corpus(tmp_path / "c.jsonl", [3] * 10)
    with pytest.raises(ValueError, match=message):
        load_corpus(name, tok, **kwargs)


def test_seq_len_beyond_tokenizer_limit(tmp_path):
    name = write_corpus(tmp_path / "c.jsonl", [3] * 10)
    with pytest.raises(ValueError, match="beyond the tokenizer's model_max_length \\(512"):
        load_corpus(name, make_tokenizer(model_max_length=512), seq_len=1024)


def test_empty_corpus_and_empty_split(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(str(empty), tok)
    one = write_corpus(tmp_path / "one.jsonl", [5])
    split = "train" if tokens.is_heldout("w0 w0 w0 w0 w0", 0, 0.5) else "heldout"
    with pytest.raises(ValueError, match=f"no tokens in the '{split}' split \\(1 documents read"):
        load_corpus(one, tok, split=split, heldout_fraction=0.5)


def test_model_context_length():
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig

    assert model_context_length(GPT2Config(n_positions=128)) == 128
    assert model_context_length(LlamaConfig(max_position_embeddings=4096)) == 4096
    assert model_context_length(Gemma3TextConfig(max_position_embeddings=32768)) == 32768


@pytest.mark.slow
def test_real_gemma_tokenizer_on_wiki_vital():
    from transformers import AutoTokenizer

    from saescope.defaults import gemma_270m_folder

    gemma = AutoTokenizer.from_pretrained(str(gemma_270m_folder()))
    corpus = load_corpus("wiki-vital", gemma, seq_len=128, max_tokens=2000, max_context=32768)
    assert corpus.n_tokens == 2000
    assert (corpus.input_ids[:, 0] == gemma.bos_token_id).all()
    eos_positions = corpus.input_ids == gemma.eos_token_id
    assert eos_positions.sum() >= corpus.n_documents - 1  # one EOS closes each finished document
    special = [gemma.bos_token_id, gemma.eos_token_id, gemma.pad_token_id]
    assert (corpus.keep_mask == ~np.isin(corpus.input_ids, special)).all()
    first_doc = corpus.input_ids[0][corpus.doc_ids[0] == corpus.doc_ids[0, 1]][:-1]
    assert gemma.decode(first_doc) == next(iter_documents("wiki-vital")).text[: len(gemma.decode(first_doc))]
