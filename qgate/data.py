"""Corpus reading, validation, chat formatting and tokenization.

Every stage reads data through this module: one reader, one canonical row shape
(``{sample_id, source, messages}``), one formatting function (:func:`render_chat`) and one
tokenizer entry point (:func:`tokenize_messages`). Bad rows never raise: whatever goes wrong
with one row (bad bytes, bad JSON, too-deep nesting, lone surrogates, an odd shape, a chat
template that chokes on it) comes back as a :class:`Reject` with a reason from
:data:`REASON_DOCS`, so every input row is accounted for. Errors about a whole file (a missing
file, an unsupported type, a corrupt parquet footer) raise, naming the file, when the paths
are expanded and counted: before any Ray work starts.

Files: JSONL (``.jsonl``, ``.ndjson``), JSON (``.json``: a list of rows, or one row per line
as Hugging Face ``datasets`` also accepts), each optionally compressed (``.gz``, ``.bz2``,
``.xz``, ``.zst``); parquet (``.parquet``, ``.pq``); Arrow IPC (``.arrow``); and directories
of these, including a Hugging Face ``datasets`` directory written by ``save_to_disk``. A UTF-8
BOM at the start of a text file is dropped.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import hashlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# Reject reasons (stable strings: they end up in parquet files and API replies).
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
UNKNOWN_SHAPE = "unknown_shape"
MISSING_ASSISTANT = "missing_assistant"
NON_STRING_CONTENT = "non_string_content"
NON_TEXT_CONTENT = "non_text_content"
UNKNOWN_ROLE = "unknown_role"
DUPLICATE_ID = "duplicate_id"
TOKENIZATION_ERROR = "tokenization_error"
NO_ANSWER_AFTER_TRUNCATION = "no_answer_after_truncation"
SCORING_ERROR = "scoring_error"
UNREADABLE_ROW = "unreadable_row"
DUPLICATE_TEXT = "duplicate_text"
NEAR_DUPLICATE = "near_duplicate"

# The one documented list of reasons: every reject row in every stage carries one of these.
REASON_DOCS: dict[str, str] = {
    MALFORMED_JSON: "the line or list item is not valid JSON (includes nesting too deep to "
    "parse and integers too long to convert)",
    INVALID_UTF8: "the bytes are not valid UTF-8, or a string holds a lone surrogate (e.g. "
    "the escape \\ud83d) that cannot be written as UTF-8",
    UNKNOWN_SHAPE: "not an object with 'messages', 'conversations' or 'instruction'+'output', "
    "or a turn / content part without the keys it needs",
    MISSING_ASSISTANT: "no assistant turn, or an assistant turn that shows nothing (empty, "
    "whitespace, control or zero-width characters only)",
    NON_STRING_CONTENT: "a content field is neither a string nor a list of text parts",
    NON_TEXT_CONTENT: "a content part is not text (image_url, input_audio, file, ...)",
    UNKNOWN_ROLE: "a turn's role is not system/user/assistant (or a ShareGPT alias of them)",
    DUPLICATE_ID: "the sample_id was already seen earlier in the corpus; the first one is kept",
    TOKENIZATION_ERROR: "the chat template raised on this row, or dropped or rewrote a message "
    "so the loss mask cannot be placed",
    NO_ANSWER_AFTER_TRUNCATION: "no loss token is left within max_length after truncation",
    SCORING_ERROR: "the model raised on this sample alone (poison sample isolated in the "
    "scoring actor)",
    UNREADABLE_ROW: "any other error while reading or validating this one row (the message "
    "says which)",
    DUPLICATE_TEXT: "the same prompt and answer (up to case and whitespace) as the kept row "
    "kept_id (dedup)",
    NEAR_DUPLICATE: "MinHash similarity to the kept row kept_id at or above the dedup "
    "threshold (dedup, or a commit to the selection log)",
}
REJECT_REASONS = tuple(REASON_DOCS)

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_SHAREGPT_ROLES |= {"system": "system", "chatgpt": "assistant", "bing": "assistant"}
# OpenAI-style content parts whose "text" is kept (Chat Completions and Responses API names).
TEXT_PART_TYPES = ("text", "input_text", "output_text")
# Text parts of one turn are joined with a newline, as vLLM's chat front end does: parts are
# usually separate paragraphs, and "" would glue the last word of one to the first of the next.
PART_SEPARATOR = "\n"
EXCERPT_CHARS = 200
BOM = "\ufeff"

# Used when a tokenizer has no chat template. Plain text markers, so any tokenizer can
# encode it; the eos token closes each assistant turn so a model learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}### System:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


class RowError(ValueError):
    """A row that cannot be used; ``reason`` is one of REJECT_REASONS.

    ``excerpt`` optionally carries the raw text of a row that never parsed, for the reject.
    """

    def __init__(self, reason: str, message: str, excerpt: str | None = None):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.excerpt = excerpt


def utf8_safe(text: str) -> str:
    """``text`` itself when it is valid UTF-8, else with lone surrogates as ``\\udXXX`` escapes.

    Reject rows and logs must be writable (parquet, JSON replies) whatever the input held.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Reject:
    """An input row that was not accepted, with the reason and a short raw excerpt.

    Text fields are made UTF-8 safe on construction (see :func:`utf8_safe`), so any Reject can
    be written to parquet or JSON.
    """

    sample_id: str | None
    source: str
    reason: str
    detail: str
    excerpt: str

    def __post_init__(self):
        for name in ("sample_id", "source", "reason", "detail", "excerpt"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, utf8_safe(value))

    def to_dict(self) -> dict:
        """Plain dict, the reject-row schema written next to scores."""
        return {
            "sample_id": self.sample_id,
            "source": self.source,
            "reason": self.reason,
            "detail": self.detail,
            "excerpt": self.excerpt,
        }


def content_hash(messages: list[dict]) -> str:
    """Stable id for a conversation: a hash of its canonical messages.

    Never raises: a lone surrogate is hashed through ``surrogatepass`` (valid text hashes
    exactly as it always did).
    """
    blob = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:20]


# ----------------------------------------------------------------------------- row shapes


def _check_unicode(value: str, where: str) -> None:
    """Raise invalid_utf8 for a string that cannot be written as UTF-8 (a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start].encode("unicode_escape").decode("ascii")
        raise RowError(
            INVALID_UTF8, f"{where} holds a lone surrogate {bad} at character {e.start}"
        ) from None


def _join_parts(parts: list, where: str) -> str:
    """Text of an OpenAI-style list of content parts; non-text parts are refused."""
    texts = []
    for j, part in enumerate(parts):
        at = f"{where} part {j}"
        if not isinstance(part, dict):
            raise RowError(
                NON_STRING_CONTENT,
                f"{at} is {type(part).__name__}, not a {{'type': 'text', 'text': ...}} object",
            )
        kind = part.get("type")
        if not isinstance(kind, str):
            raise RowError(UNKNOWN_SHAPE, f"{at} has no string 'type'")
        if kind not in TEXT_PART_TYPES:
            raise RowError(NON_TEXT_CONTENT, f"{at} has type {kind!r}; only text is scored")
        text = part.get("text")
        if not isinstance(text, str):
            raise RowError(NON_STRING_CONTENT, f"{at} 'text' is {type(text).__name__}")
        texts.append(text)
    return PART_SEPARATOR.join(texts)


def _check_content(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _join_parts(value, where)
    raise RowError(NON_STRING_CONTENT, f"{where} is {type(value).__name__}, not a string")


def _messages_from_list(turns, role_key: str, content_key: str, role_map=None) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RowError(UNKNOWN_SHAPE, f"'{role_key}' turns must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise RowError(UNKNOWN_SHAPE, f"turn {i} needs '{role_key}' and '{content_key}'")
        role = turn[role_key]
        role = role_map.get(role) if role_map and isinstance(role, str) else role
        if not isinstance(role, str) or role not in ROLES:
            shown = turn[role_key]
            shown = utf8_safe(shown)[:40] if isinstance(shown, str) else type(shown).__name__
            raise RowError(UNKNOWN_ROLE, f"turn {i} has role {shown!r}")
        messages.append({"role": role, "content": _check_content(turn[content_key], f"turn {i}")})
    return messages


def to_messages(row: dict) -> list[dict]:
    """Map a row in any accepted shape (messages, ShareGPT, Alpaca) to chat messages.

    Content may be a string or a list of OpenAI-style text parts (joined with
    PART_SEPARATOR). Every assistant turn must hold more than whitespace.
    """
    if not isinstance(row, dict):
        raise RowError(UNKNOWN_SHAPE, f"row is {type(row).__name__}, not an object")
    if "messages" in row:
        messages = _messages_from_list(row["messages"], "role", "content")
    elif "conversations" in row:
        messages = _messages_from_list(row["conversations"], "from", "value", _SHAREGPT_ROLES)
    elif "instruction" in row and "output" in row:
        instruction = _check_content(row["instruction"], "instruction")
        extra = _check_content(row.get("input") or "", "input")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}]
        messages.append({"role": "assistant", "content": _check_content(row["output"], "output")})
        if row.get("system"):
            messages.insert(
                0, {"role": "system", "content": _check_content(row["system"], "system")}
            )
    else:
        keys = [utf8_safe(str(k))[:40] for k in sorted(row, key=str)[:8]]
        raise RowError(
            UNKNOWN_SHAPE,
            f"no 'messages', 'conversations' or 'instruction'+'output' (keys: {keys})",
        )
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers or any(_blank(m["content"]) for m in answers):
        raise RowError(MISSING_ASSISTANT, "conversation has an empty or missing assistant turn")
    return messages


def _blank(text: str) -> bool:
    """Whether text shows nothing: only whitespace, control or format characters (a NUL, a
    zero-width space, a stray BOM). Stops at the first visible character, so it is cheap."""
    return all(
        c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Zs") for c in text
    )


def _given_id(row) -> str | None:
    """The row's own id ('id', else 'sample_id') as a string, or None (bools are no ids)."""
    if not isinstance(row, dict):
        return None
    given = row.get("id", row.get("sample_id"))
    if isinstance(given, bool) or not isinstance(given, str | int):
        return None
    return str(given) or None


def canonicalize(row: dict, default_source: str) -> dict:
    """Turn a raw row into ``{sample_id, source, messages}`` or raise RowError.

    Every string that leaves here (contents, id, source) is valid UTF-8, so downstream writers
    and hashes cannot fail on it.
    """
    messages = to_messages(row)
    for i, m in enumerate(messages):
        _check_unicode(m["content"], f"turn {i} content")
    sample_id = _given_id(row)
    if sample_id is not None:
        _check_unicode(sample_id, "id")
    else:
        sample_id = content_hash(messages)
    source = row.get("source")
    source = source if isinstance(source, str) and source else default_source
    _check_unicode(source, "source")
    return {"sample_id": sample_id, "source": source, "messages": messages}


def _excerpt(raw) -> str:
    """A short printable excerpt of a raw row; never raises."""
    try:
        text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    except Exception:  # too deep to serialise, or a value whose str() raises
        text = f"<{type(raw).__name__} that cannot be shown>"
    return utf8_safe(text[:EXCERPT_CHARS])


# ----------------------------------------------------------------------------- files

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


# ----------------------------------------------------------------------------- validation


def _describe(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"
    except Exception:
        return type(e).__name__


def validate(raw, default_source: str, row_index: int | None = None) -> dict | Reject:
    """Canonical row or Reject for one raw row. Never raises for anything in the row.

    RowErrors keep their reason; too-deep nesting is ``malformed_json``; any other exception
    is ``unreadable_row`` with its type and message, so one odd row can never stop a stage.
    """
    try:
        if isinstance(raw, RowError):
            raise raw
        return canonicalize(raw, default_source)
    except RowError as e:
        reason, detail = e.reason, str(e)
    except RecursionError:
        reason, detail = MALFORMED_JSON, f"{MALFORMED_JSON}: nested too deeply to validate"
    except Exception as e:
        reason, detail = UNREADABLE_ROW, f"{UNREADABLE_ROW}: {_describe(e)}"
    try:
        sample_id = _given_id(raw)
    except Exception:  # e.g. an int id over Python's digit limit
        sample_id = None
    if sample_id is None and row_index is not None:
        sample_id = f"{default_source}#row{row_index}"
    if isinstance(raw, RowError):
        excerpt = raw.excerpt if raw.excerpt is not None else str(raw)
    else:
        excerpt = _excerpt(raw)
    return Reject(sample_id, default_source, reason, detail, _excerpt(excerpt))


def iter_corpus(paths: str | Iterable[str]) -> Iterator[dict | Reject]:
    """Stream canonical rows and Rejects from files in order; later duplicate ids are rejected."""
    seen: set[str] = set()
    for path in expand_paths(paths):
        src = source_name(path)
        for i, raw in iter_raw(path):
            item = validate(raw, src, i)
            if isinstance(item, dict):
                if item["sample_id"] in seen:
                    msg = f"{DUPLICATE_ID}: sample_id {item['sample_id']!r} already seen"
                    item = Reject(
                        item["sample_id"], item["source"], DUPLICATE_ID, msg, _excerpt(raw)
                    )
                else:
                    seen.add(item["sample_id"])
            yield item


def read_corpus(paths: str | Iterable[str]) -> tuple[list[dict], list[Reject]]:
    """Read whole corpora into memory: (accepted canonical rows, rejects)."""
    rows, rejects = [], []
    for item in iter_corpus(paths):
        (rejects if isinstance(item, Reject) else rows).append(item)
    return rows, rejects


# ----------------------------------------------------------------------------- formatting


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render a conversation to text: the one formatting function of every stage.

    Uses the tokenizer's chat template, or FALLBACK_CHAT_TEMPLATE when it has none.
    """
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=template,
    )


# Stands in for each assistant content in a second rendering, to find where the template puts
# it. Private-use characters: no template trims or rewrites them, and real text rarely has them
# (when it does, the marker grows until no content holds it).
_MARK = "\ue000qgate"


def _spans_from_marks(text: str, marked: str, marks: list[str], contents: list[str]):
    """Assistant spans in ``text`` given the same conversation rendered with ``marks``.

    The template text between marks is the same in both renderings, so each answer is
    exactly what lies between its neighbouring template pieces (even where the template
    trimmed it). None when the renderings disagree outside the answers.
    """
    pieces, pos = [], 0
    for mark in marks:
        at = marked.find(mark, pos)
        if at < 0:
            return None
        pieces.append(marked[pos:at])
        pos = at + len(mark)
    tail = marked[pos:]
    if not text.startswith(pieces[0]) or not text.endswith(tail):
        return None
    spans, cursor = [], len(pieces[0])
    for k, content in enumerate(contents):
        after = pieces[k + 1] if k + 1 < len(pieces) else tail
        if text.startswith(content, cursor) and text.startswith(after, cursor + len(content)):
            end = cursor + len(content)  # verbatim: the usual case
        elif k + 1 < len(pieces):
            end = text.find(after, cursor)
        else:
            end = len(text) - len(tail)
        if end <= cursor:  # the template dropped this answer
            return None
        spans.append((cursor, end))
        cursor = end + len(after)
    return spans if cursor == len(text) else None


def _spans_by_search(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Fallback: find each message's content (or its stripped form) in order."""
    spans, cursor = [], 0
    for m in messages:
        content = m["content"]
        start = text.find(content, cursor)
        if start < 0 and content.strip():
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise RowError(
                TOKENIZATION_ERROR,
                "chat template dropped or rewrote a message; cannot place the loss mask",
            )
        cursor = start + len(content)
        if m["role"] == "assistant":
            spans.append((start, cursor))
    return spans


def _assistant_spans(tokenizer, text: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Character spans of assistant contents (plus the special token closing them) in text.

    Placed by rendering the conversation a second time with a marker for each answer, so a
    short answer ("a", "t") is never matched inside the template's own text ("<|im_start|>",
    a default system prompt).
    """
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    if not contents:
        return []
    base = _MARK
    while any(base in m["content"] for m in messages):
        base += "\ue000"
    marks = [f"{base}-answer-{k}\ue001" for k in range(len(contents))]
    it = iter(marks)
    marked_msgs = [dict(m, content=next(it)) if m["role"] == "assistant" else m for m in messages]
    try:
        marked = render_chat(tokenizer, marked_msgs)
        spans = _spans_from_marks(text, marked, marks, contents)
    except Exception:  # a template that inspects content; fall back to searching
        spans = None
    if spans is None:
        spans = _spans_by_search(text, messages)
    closers = sorted({c for c in tokenizer.all_special_tokens if c}, key=len, reverse=True)
    out = []
    for start, end in spans:
        closer = next((c for c in closers if text.startswith(c, end)), "")
        out.append((start, end + len(closer)))
    return out


def _in_loss(a: int, b: int, spans: list[tuple[int, int]]) -> bool:
    """Whether the token at characters [a, b) overlaps an assistant span.

    Overlap, not "starts inside": a BPE token may merge an answer's first character with the
    newline or space before it, and that token carries the answer. A token wholly in the
    prompt never counts, so at most one boundary token per span reaches into the prompt.
    """
    if b <= a:  # zero-width (some added tokens): inside or not
        return any(s <= a < e for s, e in spans)
    return any(a < e and b > s for s, e in spans)


def tokenize_messages(
    tokenizer, messages: list[dict], max_length: int, loss_on: str = "assistant"
) -> dict:
    """Tokenize a conversation with loss labels.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (-100 where no loss),
    ``truncated`` and ``n_tokens_full``. ``loss_on`` is 'assistant' (every token overlapping
    an assistant content or its closing special token) or 'all'. Over-long samples keep their
    first ``max_length`` tokens. A chat template that raises on this conversation, or loses a
    message, raises ``RowError(tokenization_error)``; a broken tokenizer raises as it is.
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
    try:
        text = render_chat(tokenizer, messages)
    except Exception as e:
        raise RowError(TOKENIZATION_ERROR, f"chat template failed: {_describe(e)}") from e
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=loss_on != "all")
    ids = list(enc["input_ids"])
    if loss_on == "all":
        mask = [True] * len(ids)
    else:
        spans = _assistant_spans(tokenizer, text, messages)
        mask = [_in_loss(a, b, spans) for a, b in enc["offset_mapping"]]
    n_full = len(ids)
    truncated = n_full > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)],
        "truncated": truncated,
        "n_tokens_full": n_full,
    }


def answer_only(messages: list[dict]) -> list[dict]:
    """The assistant turns alone: the context-free input that IFD compares against."""
    return [m for m in messages if m["role"] == "assistant"]


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically (temp file + rename); returns the row count."""
    tmp = f"{path}.tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
