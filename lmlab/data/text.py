"""Reading user text: .txt, .jsonl, .parquet files, folders and glob patterns -> a stream of documents.

    for doc in iter_documents(["books/", "web/*.jsonl", "extra.parquet"], field="text"): ...

A spec is a path (file or folder), a glob pattern (`*`, `?`, `[...]`; `**` recurses) or a list of these.
Folders are searched recursively; folder contents and glob matches are read in sorted path order, list
items in the order given, so the stream is deterministic. Hidden files and folders (names starting with
".") are skipped inside folders, and files of other types inside folders or glob matches are ignored; a
file named explicitly must be of a supported type. A file reached twice is read once. Empty documents
are never yielded.

Formats (gzip-compressed `.txt.gz` / `.jsonl.gz` too):
  .txt      txt_mode="file" (default): the whole file is one document, exactly as stored;
            "lines": one document per non-blank line (line ending removed);
            "paragraphs": documents separated by one or more blank lines.
  .jsonl    one JSON object per line; the document is its `field` (default "text"), which must be a
            string. Blank lines are skipped; invalid JSON, a missing field or a non-string value is a
            DataError naming the file and line.
  .parquet  the string column `field`, read with pyarrow (`pip install pyarrow`).
Text is decoded as UTF-8; invalid bytes are replaced by U+FFFD with a warning naming the file.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Union

from lmlab.errors import LmlabError

TXT_MODES = ("file", "lines", "paragraphs")
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
Spec = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]


class DataError(LmlabError, ValueError):
    """A data file or spec is unusable; the message names the file (and line or row)."""


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix.split(".")[1]  # txt | jsonl | parquet
    return None


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _walk(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p, folder) and _kind(p))


def list_files(spec: Spec) -> list[Path]:
    """The files a spec names, in reading order (see the module docstring)."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise DataError("no data given (an empty list of paths)")
    files: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise DataError(f"a data spec item must be a path or glob pattern, not {type(item).__name__}")
        path = Path(item).expanduser()
        if path.is_dir():
            found = _walk(path)
            if not found:
                raise DataError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
        elif path.is_file():
            if _kind(path) is None:
                raise DataError(f"{path}: unsupported file type; lmlab reads {', '.join(SUFFIXES)}")
            found = [path]
        elif glob.has_magic(str(item)):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(str(item)), recursive=True))
            found = []
            for m in matches:
                found += _walk(m) if m.is_dir() else [m] if _kind(m) else []
            if not found:
                raise DataError(f"{item}: the pattern matches no {', '.join(SUFFIXES)} files")
        else:
            raise DataError(f"{path}: no such file or folder")
        files += found
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key in seen:
            warnings.warn(f"{f} is named more than once in the data spec; it is read once")
            continue
        seen.add(key)
        unique.append(f)
    return unique


def iter_documents(spec: Spec, field: str = "text", txt_mode: str = "file") -> Iterator[str]:
    """Yield the documents of every file the spec names, in a deterministic order (see the module docstring)."""
    if txt_mode not in TXT_MODES:
        raise DataError(f"unknown txt_mode {txt_mode!r}; choose one of {TXT_MODES}")
    for path in list_files(spec):
        kind = _kind(path)
        if kind == "txt":
            yield from _read_txt(path, txt_mode)
        elif kind == "jsonl":
            yield from _read_jsonl(path, field)
        else:
            yield from _read_parquet(path, field)


# ------------------------------------------------------------------------------------------------ readers
def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


class _Decoder:
    """UTF-8 decoding that replaces invalid bytes and warns once per file."""

    def __init__(self, path: Path):
        self.path, self.bad = path, 0

    def __call__(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.bad += 1
            return raw.decode("utf-8", errors="replace")

    def done(self):
        if self.bad:
            warnings.warn(f"{self.path}: {self.bad} piece(s) of text were not valid UTF-8; "
                          "invalid bytes were replaced by U+FFFD")


def _read_txt(path: Path, mode: str) -> Iterator[str]:
    dec = _Decoder(path)
    with _open(path) as f:
        if mode == "file":
            text = dec(f.read())
            if text:
                yield text
        elif mode == "lines":
            for raw in f:
                line = dec(raw).rstrip("\n").rstrip("\r")
                if line.strip():
                    yield line
        else:  # paragraphs: runs of non-blank lines, joined with their own line breaks
            para: list[str] = []
            for raw in f:
                line = dec(raw)
                if line.strip():
                    para.append(line)
                elif para:
                    yield "".join(para).rstrip("\r\n")
                    para = []
            if para:
                yield "".join(para).rstrip("\r\n")
    dec.done()


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a .jsonl file; anything but an object is a DataError."""
    dec = _Decoder(path)
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = dec(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
    dec.done()


def iter_records(spec: Spec) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for every record of the .jsonl files a spec names (structured data: chat
    conversations, preference pairs), so that errors can name the line."""
    for path in list_files(spec):
        if _kind(path) != "jsonl":
            raise DataError(f"{path}: structured data must be .jsonl (one JSON object per line)")
        for lineno, obj in _jsonl_objects(path):
            yield f"{path}:{lineno}", obj


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    for lineno, obj in _jsonl_objects(path):
        if field not in obj:
            keys = ", ".join(map(repr, list(obj)[:10])) or "none"
            raise DataError(f"{path}:{lineno}: no {field!r} field (fields: {keys}); "
                            "choose the text field with field=...")
        text = obj[field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
        if text:
            yield text


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}); "
                        "choose the text column with field=...")
    ftype = schema.field(field).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)
            or getattr(pa.types, "is_string_view", lambda t: False)(ftype)):
        raise DataError(f"{path}: column {field!r} has type {ftype}, not string")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise DataError(f"{path}: row {row} has no value (null) in column {field!r}")
            row += 1
            if text:
                yield text
