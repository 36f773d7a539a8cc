"""Reading and cleaning a text corpus into a list of documents.

    docs, stats = load_corpus(["notes/", "book.txt"])     # files and directories, recursively
    docs, stats = load_corpus(None, max_bytes=8 << 20)     # the default: the Python stdlib's .py sources

A document is one file, or, with `doc_separator` (e.g. "\n\n\n"), each piece of a file between separators.
Cleaning keeps what code needs (indentation, tabs, inner blank lines) and removes what only adds noise:
every document is NFC-normalised, line endings become "\n", trailing whitespace is cut from each line and
leading/trailing blank lines are dropped. Empty documents and exact duplicates (same cleaned text, by
SHA-256) are dropped, the first copy kept. Everything is in sorted path order, so the same inputs always
give the same documents in the same order.
"""

import hashlib
import os
import sysconfig
import unicodedata
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SUFFIXES = (".txt", ".md", ".py")


@dataclass
class CorpusStats:
    files: int = 0          # files read
    undecodable: int = 0    # files skipped because they are not UTF-8
    documents: int = 0      # documents kept
    empty: int = 0          # documents dropped as empty after cleaning
    duplicates: int = 0     # documents dropped as exact duplicates of an earlier one
    chars: int = 0          # characters in the kept documents

    def __str__(self):
        return (f"{self.documents} documents ({self.chars} chars) from {self.files} files; dropped "
                f"{self.empty} empty, {self.duplicates} duplicate, {self.undecodable} non-UTF-8")


def clean_text(text: str) -> str:
    """NFC, "\n" line endings, no trailing whitespace on any line, no leading or trailing blank lines."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def stdlib_files() -> list:
    """The Python standard library's own .py files, sorted; installed packages are left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not skip.intersection(p.relative_to(root).parts))


def list_files(sources, suffixes=DEFAULT_SUFFIXES) -> list:
    """Files named in `sources` (a path or a list of paths); directories are searched recursively for
    files whose name ends in one of `suffixes`. A file named directly is taken whatever its suffix."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    suffixes = tuple(s.lower() for s in suffixes)
    files = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*")
                                if p.is_file() and p.name.lower().endswith(suffixes)))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"sources: {str(path)!r} is neither a file nor a directory")
    return files


def load_corpus(sources=None, suffixes=DEFAULT_SUFFIXES, doc_separator=None, max_bytes=None):
    """Read, clean and deduplicate documents. `sources` None means the stdlib's .py files. Reading stops
    before the file that would take the raw bytes read past `max_bytes` (None: no cap; the first file is
    always read).
    Returns (documents, CorpusStats)."""
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    if doc_separator is not None and not doc_separator:
        raise ValueError("doc_separator must be a non-empty string or None")
    files = stdlib_files() if sources is None else list_files(sources, suffixes)
    stats = CorpusStats()
    seen = set()
    docs = []
    total = 0
    for path in files:
        raw = path.read_bytes()
        if max_bytes is not None and total + len(raw) > max_bytes and stats.files > 0:
            break
        total += len(raw)
        stats.files += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.undecodable += 1
            continue
        if text.startswith("\ufeff"):
            text = text[1:]
        pieces = [text] if doc_separator is None else text.replace("\r\n", "\n").split(doc_separator)
        for piece in pieces:
            doc = clean_text(piece)
            if not doc:
                stats.empty += 1
                continue
            digest = hashlib.sha256(doc.encode("utf-8")).digest()
            if digest in seen:
                stats.duplicates += 1
                continue
            seen.add(digest)
            docs.append(doc)
            stats.chars += len(doc)
    stats.documents = len(docs)
    if not docs:
        raise ValueError(f"sources: no non-empty documents found in {stats.files} files")
    return docs, stats


def hash_documents(docs) -> str:
    """SHA-256 of the documents in order (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
