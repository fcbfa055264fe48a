"""Reading corpus files: every supported format and compression, one raw row at a time.

JSONL and JSON (optionally .gz, .bz2, .xz, .zst), parquet, Arrow and Hugging Face
``save_to_disk`` directories, as local paths, globs or fsspec URIs. A row that cannot even
be parsed is yielded as a RowError with its reason, never raised, so one bad row cannot stop
a file.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import io
import json
import os
import re
from collections.abc import Iterable, Iterator

from qgate.rejects import (
    EXCERPT_CHARS,
    INVALID_UTF8,
    MALFORMED_JSON,
    UNREADABLE_ROW,
    RowError,
    utf8_safe,
)

BOM = "\ufeff"


_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
}
# Stream compressions for the text formats, inferred from the last suffix.
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
SUPPORTED_TYPES = (
    ".jsonl, .ndjson or .json (each also as .gz, .bz2, .xz or .zst), .parquet, .pq, .arrow "
    "(Arrow IPC, as Hugging Face save_to_disk writes), or a directory of them"
)
# Files in a corpus directory that are not rows: docs, checksums, Hugging Face metadata.
# Names starting with '.' or '_' (_SUCCESS, _metadata, .gitattributes) are skipped too.
_SIDE_FILES = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}
_SIDE_SUFFIXES = (".md", ".txt", ".crc", ".lock", "license")
# A shard suffix ("-00000-of-00004") or a Spark part file: the name says nothing of the source.
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")
_PART_FILE = re.compile(r"part[-_]?\d+.*")


def _file_type(path: str) -> tuple[str, str | None]:
    """(format, compression or None) from the file name; ValueError for anything else."""
    name = path.lower()
    compression = None
    for ext, comp in _COMPRESSIONS.items():
        if name.endswith(ext):
            compression, name = comp, name[: -len(ext)]
            break
    fmt = next((f for ext, f in _FORMATS.items() if name.endswith(ext)), None)
    if fmt is None or (compression and fmt in ("parquet", "arrow")):
        raise ValueError(f"unsupported corpus file type: {path} (supported: {SUPPORTED_TYPES})")
    if compression == "zstd":
        import importlib.util

        if importlib.util.find_spec("zstandard") is None:
            raise ValueError(
                f"{path}: reading .zst needs the zstandard package (pip install zstandard)"
            )
    return fmt, compression


def file_format(path: str) -> str:
    """'jsonl', 'json', 'parquet' or 'arrow', from the file name (compression suffix aside)."""
    return _file_type(path)[0]


def source_name(path: str) -> str:
    """Default source of a file's rows: its base name without extensions.

    Shard files name their dataset, not themselves: "train-00000-of-00004.parquet" is
    "train", and "data-00000-of-00001.arrow" (save_to_disk) or "part-00003-....parquet"
    (Spark) take their directory's name, so every shard of one dataset has one source.
    """
    path = path.rstrip("/")
    base = os.path.basename(path).split(".")[0]
    stem = _SHARD_SUFFIX.sub("", base)
    if (stem != base and stem in ("data", "part")) or _PART_FILE.fullmatch(base):
        stem = os.path.basename(os.path.dirname(path)) or stem
    return utf8_safe(stem or "corpus")


def _is_side_file(rel: str) -> bool:
    parts = rel.split("/")
    name = parts[-1].lower()
    hidden = any(p.startswith((".", "_")) for p in parts)
    return hidden or name in _SIDE_FILES or name.endswith(_SIDE_SUFFIXES)


def _dir_files(fs, root: str, shown: str) -> list[str]:
    """Data files under directory ``root`` (relative, in read order); ``shown`` names it."""
    root = root.rstrip("/")
    rel = sorted(f[len(root) + 1 :] for f in fs.find(root))
    top = set(rel)
    if "dataset_dict.json" in top:
        splits = json.loads(fs.cat_file(f"{root}/dataset_dict.json")).get("splits", [])
        raise ValueError(
            f"{shown} is a Hugging Face DatasetDict with splits {splits}: point the corpus at "
            f"one split's directory (e.g. {shown.rstrip('/')}/{(splits or ['train'])[0]})"
        )
    if "state.json" in top:  # save_to_disk: state.json lists the shards in order
        state = json.loads(fs.cat_file(f"{root}/state.json"))
        return [d["filename"] for d in state.get("_data_files", [])]
    found = [r for r in rel if not _is_side_file(r)]
    for r in found:  # an unknown file in a corpus directory is an error, not skipped
        try:
            _file_type(r)
        except ValueError as e:
            raise ValueError(f"in corpus directory {shown}: {e}") from None
    if not found:
        raise FileNotFoundError(
            f"corpus directory holds no data files ({SUPPORTED_TYPES}): {shown}"
        )
    return found


def _expand_one(p: str) -> list[str]:
    """One corpus path (file, glob or directory; local or URI) -> its data files."""
    import fsspec

    remote = "://" in p
    if remote:
        fs, _, found = fsspec.get_fs_token_paths(p)
        proto = p.split("://", 1)[0]
        found = [f if "://" in f else f"{proto}://{f}" for f in found]
    else:
        fs = fsspec.filesystem("file")
        found = sorted(_glob.glob(p)) if _glob.has_magic(p) else [p]
    if not found:
        raise FileNotFoundError(f"corpus path matched no files: {p}")
    files = []
    for f in found:
        if fs.isdir(f):
            rel = _dir_files(fs, fs._strip_protocol(f), f)
            sep = "/" if remote else os.sep
            files += [f.rstrip(sep) + sep + r.replace("/", sep) for r in rel]
        elif fs.isfile(f):
            files.append(f)
        else:
            raise FileNotFoundError(f"corpus file not found: {f}")
    return files


def expand_paths(paths: str | os.PathLike | Iterable[str]) -> list[str]:
    """Expand globs and directories (local paths or fsspec URIs) into a de-duplicated file list.

    Runs before any Ray work, so a missing file, an unsupported file type or an unreadable
    layout fails here, naming the path. Globs expand sorted; a directory expands to its data
    files (recursively, sorted; save_to_disk's own shard order for a ``datasets`` directory).
    """
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    out: list[str] = []
    for p in paths:
        for f in _expand_one(os.fspath(p)):
            _file_type(f)  # unsupported types fail now, naming the file
            if f not in out:
                out.append(f)
    return out


@contextlib.contextmanager
def _open_bytes(path: str):
    """The file's decompressed bytes, as a binary file (compression from the name)."""
    import fsspec

    _, compression = _file_type(path)
    with fsspec.open(path, "rb") as raw:
        if compression is None:
            yield raw
        else:
            with _decompress(raw, compression) as f:
                yield f


def _decompress(raw, compression: str):
    if compression == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bz2":
        import bz2

        return bz2.BZ2File(raw)
    if compression == "xz":
        import lzma

        return lzma.LZMAFile(raw)
    import zstandard

    # read_across_frames: multi-frame files (pzstd, concatenated); windows up to 2 GiB
    # (zstd --long=31). Its reader has no readline, hence the buffer.
    dec = zstandard.ZstdDecompressor(max_window_size=2**31)
    return io.BufferedReader(dec.stream_reader(raw, read_across_frames=True), 1 << 20)


# ----------------------------------------------------------------------------- rows of a file

_BOM_BYTES = BOM.encode("utf-8")
_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")
_BRACKET_OR_QUOTE = re.compile(r'[\[\]{}"]')
_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*+"', re.S)  # after an opening quote
_SCALAR_END = re.compile(r"[,\]]")


def _loads(text: str, excerpt: str):
    """Parsed JSON, or a RowError for text that is not (too deep, too long an int, ...)."""
    try:
        return json.loads(text)
    except RecursionError:
        return RowError(MALFORMED_JSON, "nested too deeply to parse", excerpt)
    except ValueError as e:  # JSONDecodeError, or an integer over Python's digit limit
        return RowError(MALFORMED_JSON, str(e), excerpt)
    except Exception as e:
        return RowError(UNREADABLE_ROW, f"{type(e).__name__}: {e}", excerpt)


def _parse_line(line: bytes):
    """One JSONL line -> its parsed value, or a RowError (invalid_utf8 / malformed_json)."""
    excerpt = line[: 4 * EXCERPT_CHARS].decode("utf-8", "backslashreplace")[:EXCERPT_CHARS]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError(INVALID_UTF8, f"byte {e.start} is not valid UTF-8", excerpt)
    return _loads(text, excerpt)


def _value_end(text: str, pos: int) -> int | None:
    """End of the JSON-ish value at ``pos`` by bracket matching, for skipping a bad list item.

    Used only after the real parser failed on the item (too deep, or malformed); returns
    None when the text ends inside it.
    """
    if pos >= len(text):
        return None
    if text[pos] not in '[{"':
        m = _SCALAR_END.search(text, pos)
        return m.start() if m else None
    depth, i = 0, pos
    while True:
        m = _BRACKET_OR_QUOTE.search(text, i)
        if m is None:
            return None
        if m.group() == '"':
            s = _STRING_REST.match(text, m.end())
            if s is None:
                return None
            i = s.end()
        else:
            depth += 1 if m.group() in "[{" else -1
            i = m.end()
        if depth <= 0:
            return i


def _json_list_items(text: str) -> Iterator:
    """Items of a JSON list document, each parsed alone, so one bad item is one bad row.

    A bad item becomes a RowError; when the list's own structure breaks (a truncated file),
    the rest of the text becomes one last RowError row.
    """
    pos = _WS.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        excerpt = utf8_safe(text[pos : pos + EXCERPT_CHARS])
        try:
            item, end = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            end = _value_end(text, pos)
            if isinstance(e, json.JSONDecodeError):
                why = f"{e.msg} at character {e.pos - pos} of the item"
            elif isinstance(e, RecursionError):
                why = "nested too deeply to parse"
            else:  # an integer over Python's digit limit
                why = str(e)
            if end is None:
                yield RowError(MALFORMED_JSON, f"file ends inside this item ({why})", excerpt)
                return
            item = RowError(MALFORMED_JSON, why, excerpt)
        yield item
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
            if not (text.startswith("]", pos) and not text[pos + 1 :].strip()):
                continue  # else a trailing comma: the list ends here
        if text.startswith("]", pos) and not text[pos + 1 :].strip():
            return
        rest = utf8_safe(text[pos : pos + EXCERPT_CHARS])
        yield RowError(MALFORMED_JSON, f"expected ',' or ']' at character {pos}", rest)
        return


def _text_items(path: str, fmt: str) -> Iterator:
    """Rows of a JSONL/JSON file in order: bytes lines (parsed later) or parsed list items.

    A .json file holding a list is read as a list; one holding an object per line is read
    as JSON Lines. Blank lines are not rows. A leading UTF-8 BOM is dropped.
    """
    with _open_bytes(path) as f:
        head: list[bytes] = []
        line = f.readline()
        if line.startswith(_BOM_BYTES):
            line = line[len(_BOM_BYTES) :]
        while line and not line.strip():
            head.append(line)
            line = f.readline()
        head.append(line)
        first = line.lstrip()[:1]
        if fmt == "json" and first == b"[":
            text = b"".join(head) + f.read()
            # invalid bytes become lone surrogates, which validation rejects as invalid_utf8
            yield from _json_list_items(text.decode("utf-8", "surrogateescape"))
            return
        if fmt == "json" and first not in (b"{", b""):
            raise ValueError(
                f"{path}: a .json corpus holds a list of rows or one JSON object per line"
            )
        if fmt == "json" and line.strip() == b"{":
            raise ValueError(
                f"{path}: holds one pretty-printed JSON object; a .json corpus holds a list of "
                "rows or one JSON object per line"
            )
        for raw_line in head:
            if raw_line.strip():
                yield raw_line
        for raw_line in f:
            if raw_line.strip():
                yield raw_line


def _columnar_rows(table, first_index: int) -> Iterator[tuple[int, dict]]:
    for i, row in enumerate(table.to_pylist(), first_index):
        yield i, {k: v for k, v in row.items() if v is not None}


def _parquet_rows(path: str, start: int, stop: int | None) -> Iterator[tuple[int, dict]]:
    """Rows [start, stop) of a parquet file, reading only the row groups that hold them."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        lo = 0
        for g in range(pf.num_row_groups):
            hi = lo + pf.metadata.row_group(g).num_rows
            if stop is not None and lo >= stop:
                return
            if hi > start:
                a, b = max(start, lo), hi if stop is None else min(stop, hi)
                yield from _columnar_rows(pf.read_row_group(g).slice(a - lo, b - a), a)
            lo = hi


def _arrow_batches(path: str) -> Iterator:
    """Record batches of an Arrow IPC file, stream format (save_to_disk) or file format."""
    import fsspec
    import pyarrow as pa
    import pyarrow.ipc as ipc

    opened = pa.memory_map(path) if "://" not in path else fsspec.open(path, "rb").open()
    with opened as f:
        magic = f.read(6)
        f.seek(0)
        try:
            if magic == b"ARROW1":
                reader = ipc.open_file(f)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = ipc.open_stream(f)
            yield from batches
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: not a readable Arrow IPC file ({e})") from e


def _arrow_rows(path: str, start: int, stop: int | None) -> Iterator[tuple[int, dict]]:
    lo = 0
    for batch in _arrow_batches(path):
        hi = lo + batch.num_rows
        if stop is not None and lo >= stop:
            return
        if hi > start:
            a, b = max(start, lo), hi if stop is None else min(stop, hi)
            yield from _columnar_rows(batch.slice(a - lo, b - a), a)
        lo = hi


def iter_raw(path: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, object]]:
    """Yield ``(row_index, raw)`` for rows [start, stop) of one file.

    ``raw`` is the parsed row, or a RowError for a row that is not valid UTF-8 or JSON.
    Blank JSONL lines are not rows. Text files are streamed and reading stops at ``stop``;
    parquet reads only the row groups in range, so each shard reads (about) its own rows.
    """
    fmt = file_format(path)
    if fmt == "parquet":
        yield from _parquet_rows(path, start, stop)
        return
    if fmt == "arrow":
        yield from _arrow_rows(path, start, stop)
        return
    for i, item in enumerate(_text_items(path, fmt)):
        if stop is not None and i >= stop:
            return
        if i >= start:
            yield i, _parse_line(item) if isinstance(item, bytes) else item


def count_rows(path: str) -> int:
    """Number of rows in a file, without parsing JSONL lines (used to plan shards).

    Agrees with :func:`iter_raw` row for row, and raises for a file that cannot be read at
    all (so a bad file fails at planning, before Ray starts).
    """
    fmt = file_format(path)
    if fmt == "parquet":
        import fsspec
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    if fmt == "arrow":
        return sum(b.num_rows for b in _arrow_batches(path))
    return sum(1 for _ in _text_items(path, fmt))


def plan_shards(paths: list[str], rows_per_shard: int) -> list[dict]:
    """Deterministic shards: (file, row range) chunks named ``<file index>-<chunk index>``."""
    shards = []
    for fi, path in enumerate(paths):
        n = count_rows(path)
        for ci, start in enumerate(range(0, max(n, 1), rows_per_shard)):
            stop = min(start + rows_per_shard, n)
            if stop > start:
                shards.append(
                    {"shard": f"{fi:05d}-{ci:06d}", "path": path, "start": start, "stop": stop}
                )
    return shards
