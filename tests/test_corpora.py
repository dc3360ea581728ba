"""Corpus readers: every file kind, '+' joins, shuffling and mixing, named corpora, clear errors."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from saescope import corpora
from saescope.corpora import Document, iter_documents, read_corpus, rst_sections, split_corpus_name

WIKI_TOPICS = {
    "People", "Biology and health sciences", "Geography", "Uncategorized", "Physical sciences",
    "Society and social sciences", "Arts", "Technology", "History", "Everyday life",
    "Philosophy and religion", "Mathematics",
}  # fmt: skip


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_txt_file_is_one_document_named_by_its_stem(tmp_path):
    (tmp_path / "book.txt").write_text("Call me Ishmael.\n\nSome years ago.")
    assert list(read_corpus(str(tmp_path / "book.txt"))) == [Document("Call me Ishmael.\n\nSome years ago.", "book")]


def test_folder_subsets_are_first_level_subfolders(tmp_path):
    root = tmp_path / "notes"
    (root / "poems" / "old").mkdir(parents=True)
    (root / "essays").mkdir()
    (root / "top.md").write_text("top level")
    (root / "poems" / "a.txt").write_text("poem a")
    (root / "poems" / "old" / "b.rst").write_text("poem b")
    (root / "essays" / "c.txt").write_text("essay c")
    (root / "essays" / "empty.txt").write_text("  \n")  # whitespace only: skipped
    (root / "essays" / "image.png").write_bytes(b"\x89PNG")  # not text: ignored
    docs = sorted(read_corpus(str(root)))
    assert docs == sorted([
        Document("top level", "notes"), Document("poem a", "poems"),
        Document("poem b", "poems"), Document("essay c", "essays"),
    ])  # fmt: skip


def test_jsonl_with_and_without_subset(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"text": "one", "subset": "a"}, {"text": "two"}, {"text": ""}])
    (tmp_path / "mix.jsonl").write_text(path.read_text() + "\n")  # a trailing blank line is fine
    assert list(read_corpus(str(path))) == [Document("one", "a"), Document("two", "mix")]


@pytest.mark.parametrize(
    "line, message",
    [('{"text": "ok"}\n{not json}\n', r"bad\.jsonl:2: not valid JSON"), ('{"body": "x"}\n', r"bad\.jsonl:1: .*'text'")],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line)
    with pytest.raises(ValueError, match=message):
        list(read_corpus(str(path)))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "beta", None], "subset": ["x", None, "y"]}), tmp_path / "d.parquet")
    assert list(read_corpus(str(tmp_path / "d.parquet"))) == [Document("alpha", "x"), Document("beta", "d")]
    pq.write_table(pa.table({"body": ["alpha"]}), tmp_path / "nobody.parquet")
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: body\)"):
        read_corpus(str(tmp_path / "nobody.parquet"))


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes `import pyarrow.parquet` fail
    with pytest.raises(RuntimeError, match="pip install pyarrow"):
        read_corpus(str(tmp_path / "d.parquet"))


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["a b", "c d"], "subset": ["s1", "s2"]}).save_to_disk(str(single))
    assert list(read_corpus(f"hf:{single}")) == [Document("a b", "s1"), Document("c d", "s2")]
    assert list(read_corpus(str(single))) == list(read_corpus(f"hf:{single}"))  # a bare folder works too

    splits = tmp_path / "splits"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["train doc"], "meta": [{"pile_set_name": "Wikipedia (en)"}]}),
        "test": datasets.Dataset.from_dict({"text": ["test doc"], "meta": [{"pile_set_name": "Europarl"}]}),
    }).save_to_disk(str(splits))  # fmt: skip
    assert list(read_corpus(f"hf:{splits}")) == [Document("train doc", "Wikipedia (en)")]
    assert list(read_corpus(f"hf:{splits}:test")) == [Document("test doc", "Europarl")]
    with pytest.raises(ValueError, match="no split 'validation'"):
        read_corpus(f"hf:{splits}:validation")
    nocol = tmp_path / "nocol"
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(nocol))
    with pytest.raises(ValueError, match="no 'text' column"):
        read_corpus(f"hf:{nocol}")


def test_hf_missing_local_folder(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        read_corpus(f"hf:{tmp_path / 'missing'}")


def test_hf_without_datasets_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RuntimeError, match="pip install datasets"):
        read_corpus("hf:some/dataset")


def test_unknown_and_missing_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown corpus 'wiki-vitl'.*wiki-vital, python-docs.*\.jsonl.*hf:"):
        read_corpus("wiki-vitl")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl does not exist"):
        read_corpus("nowhere.jsonl")
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported kind '.csv'"):
        read_corpus(str(tmp_path / "table.csv"))
    with pytest.raises(ValueError, match="empty part"):
        split_corpus_name("wiki-vital+")


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"holds no \.txt/\.md/\.rst files"):
        read_corpus(str(tmp_path))


def test_plus_joins_but_not_inside_an_existing_path(tmp_path):
    assert split_corpus_name("wiki-vital+python-docs") == ["wiki-vital", "python-docs"]
    odd = tmp_path / "a+b.txt"
    odd.write_text("x")
    assert split_corpus_name(str(odd)) == [str(odd)]


def test_shuffle_is_a_deterministic_permutation(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(100)])
    natural = list(read_corpus(str(path)))
    order_a = list(iter_documents(str(path), seed=0))
    assert order_a == list(iter_documents(str(path), seed=0))
    assert order_a != natural and sorted(order_a) == sorted(natural)
    assert list(iter_documents(str(path), seed=1)) != order_a
    small_buffer = list(iter_documents(str(path), seed=0, shuffle_buffer=10))  # a local shuffle
    assert sorted(small_buffer) == sorted(natural) and small_buffer != natural


def test_join_mixes_parts_in_equal_shares_of_text(tmp_path):
    long_docs = write_jsonl(tmp_path / "long.jsonl", [{"text": "L" * 1000} for _ in range(20)])
    short_docs = write_jsonl(tmp_path / "short.jsonl", [{"text": "s" * 10} for _ in range(5000)])
    docs = list(iter_documents(f"{long_docs}+{short_docs}"))
    assert Counter(d.subset for d in docs) == {"long": 20, "short": 5000}  # nothing lost
    first = docs[:1000]
    chars = Counter()
    for doc in first:
        chars[doc.subset] += len(doc.text)
    assert abs(chars["long"] - chars["short"]) <= 1000  # within one long document


def test_wiki_vital_topics_are_its_subsets():
    docs = list(read_corpus("wiki-vital"))
    assert 9000 < len(docs) < 11000
    assert {d.subset for d in docs} == WIKI_TOPICS
    assert all(d.text.strip() for d in docs)


def test_python_docs_pages_split_into_sections():
    if not corpora.glob.glob("/usr/share/doc/python3.*/html/_sources"):
        pytest.skip(f"python-docs not installed ({corpora.INSTALL_PYTHON_DOCS})")
    docs = list(read_corpus("python-docs"))
    subsets = Counter(d.subset for d in docs)
    assert {"python-docs/library", "python-docs/tutorial", "python-docs/reference"} <= set(subsets)
    assert subsets.most_common(1)[0][0] == "python-docs/library"
    assert len(docs) > 1000  # ~500 pages become ~2,300 sections
    assert any("def " in d.text for d in docs if d.subset == "python-docs/tutorial")


def test_python_docs_missing_names_the_install(monkeypatch):
    monkeypatch.setattr(corpora.glob, "glob", lambda pattern: [])
    with pytest.raises(RuntimeError, match="apt-get install python3.11-doc"):
        read_corpus("python-docs")


def test_rst_sections_split_at_headings_and_merge_short_ones():
    page = (
        "=====\nTitle\n=====\n\nintro " + "x" * 50 + "\n\n"
        "First\n-----\n\n" + "a" * 300 + "\n\n"
        "Second\n------\n\nshort\n\n"
        "Third\n-----\n\n" + "c" * 300 + "\n"
        "not a heading\n\n---\n"  # a transition line after a blank line, not an underline
    )
    assert "".join(rst_sections(page, min_chars=1)) == page  # nothing lost or reordered
    titles = [s.splitlines()[1] if s.startswith("=") else s.splitlines()[0] for s in rst_sections(page, min_chars=1)]
    assert titles == ["Title", "First", "Second", "Third"]
    merged = rst_sections(page, min_chars=200)
    assert [s.splitlines()[0] for s in merged] == ["=====", "Second"]  # Title+First, Second+Third
    assert rst_sections("no headings at all", min_chars=200) == ["no headings at all"]

