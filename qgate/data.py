"""Corpus reading, validation, chat formatting and tokenization.

Every stage reads data through this module: one reader, one canonical row shape
(``{sample_id, source, messages}``), one formatting function (:func:`render_chat`) and one
tokenizer entry point (:func:`tokenize_messages`). Bad rows never raise: they come back as
:class:`Reject` records with a reason, so every input row is accounted for.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# Reject reasons (stable strings: they end up in parquet files and API replies).
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
UNKNOWN_SHAPE = "unknown_shape"
MISSING_ASSISTANT = "missing_assistant"
NON_STRING_CONTENT = "non_string_content"
UNKNOWN_ROLE = "unknown_role"
DUPLICATE_ID = "duplicate_id"
NO_ANSWER_AFTER_TRUNCATION = "no_answer_after_truncation"
REJECT_REASONS = (
    MALFORMED_JSON,
    INVALID_UTF8,
    UNKNOWN_SHAPE,
    MISSING_ASSISTANT,
    NON_STRING_CONTENT,
    UNKNOWN_ROLE,
    DUPLICATE_ID,
    NO_ANSWER_AFTER_TRUNCATION,
)

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_SHAREGPT_ROLES |= {"system": "system", "chatgpt": "assistant", "bing": "assistant"}
EXCERPT_CHARS = 200

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
    """A row that cannot be used; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Reject:
    """An input row that was not accepted, with the reason and a short raw excerpt."""

    sample_id: str | None
    source: str
    reason: str
    detail: str
    excerpt: str

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
    """Stable id for a conversation: a hash of its canonical messages."""
    blob = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _check_content(value, where: str) -> str:
    if not isinstance(value, str):
        raise RowError(NON_STRING_CONTENT, f"{where} is {type(value).__name__}, not a string")
    return value


def _messages_from_list(turns, role_key: str, content_key: str, role_map=None) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RowError(UNKNOWN_SHAPE, f"'{role_key}' turns must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise RowError(UNKNOWN_SHAPE, f"turn {i} needs '{role_key}' and '{content_key}'")
        role = turn[role_key]
        role = role_map.get(role) if role_map and isinstance(role, str) else role
        if role not in ROLES:
            raise RowError(UNKNOWN_ROLE, f"turn {i} has role {turn[role_key]!r}")
        messages.append({"role": role, "content": _check_content(turn[content_key], f"turn {i}")})
    return messages


def to_messages(row: dict) -> list[dict]:
    """Map a row in any accepted shape (messages, ShareGPT, Alpaca) to chat messages."""
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
        keys = sorted(row)[:8]
        raise RowError(
            UNKNOWN_SHAPE,
            f"no 'messages', 'conversations' or 'instruction'+'output' (keys: {keys})",
        )
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers or any(not m["content"].strip() for m in answers):
        raise RowError(MISSING_ASSISTANT, "conversation has an empty or missing assistant turn")
    return messages


def canonicalize(row: dict, default_source: str) -> dict:
    """Turn a raw row into ``{sample_id, source, messages}`` or raise RowError."""
    messages = to_messages(row)
    given = row.get("id", row.get("sample_id"))
    sample_id = (
        str(given) if isinstance(given, str | int) and str(given) else content_hash(messages)
    )
    source = row.get("source")
    source = source if isinstance(source, str) and source else default_source
    return {"sample_id": sample_id, "source": source, "messages": messages}


def _excerpt(raw) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return text[:EXCERPT_CHARS]


def expand_paths(paths: str | Iterable[str]) -> list[str]:
    """Expand globs in local paths or fsspec URIs into a sorted, de-duplicated file list."""
    import fsspec

    paths = [paths] if isinstance(paths, str) else list(paths)
    out: list[str] = []
    for p in paths:
        if "://" in p:
            fs, _, found = fsspec.get_fs_token_paths(p)
            proto = p.split("://", 1)[0]
            found = [f if "://" in f else f"{proto}://{f}" for f in found]
        else:
            found = sorted(_glob.glob(p)) if _glob.has_magic(p) else [p]
        if not found:
            raise FileNotFoundError(f"corpus path matched no files: {p}")
        for f in found:
            if "://" not in f and not os.path.isfile(f):
                raise FileNotFoundError(f"corpus file not found: {f}")
            if f not in out:
                out.append(f)
    return out


def source_name(path: str) -> str:
    """Default source of a file's rows: its base name without extensions."""
    return os.path.basename(path.rstrip("/")).split(".")[0] or "corpus"


def _open(path: str):
    import fsspec

    return fsspec.open(path, "rb").open()


def file_format(path: str) -> str:
    """'jsonl', 'json' or 'parquet', from the file name."""
    name = path.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json")):
        if name.endswith(ext):
            return fmt
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    raise ValueError(f"unsupported corpus file type (use .jsonl, .json or .parquet): {path}")


def iter_raw(path: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, object]]:
    """Yield ``(row_index, raw)`` for rows [start, stop) of one file.

    ``raw`` is the parsed row, or a RowError for a line that is not valid UTF-8 or JSON.
    Blank JSONL lines are not rows.
    """
    fmt = file_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open(path) as f:
            table = pq.read_table(f)
        stop = table.num_rows if stop is None else min(stop, table.num_rows)
        for i, row in enumerate(table.slice(start, max(stop - start, 0)).to_pylist(), start):
            yield i, {k: v for k, v in row.items() if v is not None}
        return
    with _open(path) as f:
        if fmt == "json":
            try:
                rows = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: not a valid JSON document ({e})") from e
            if not isinstance(rows, list):
                raise ValueError(f"{path}: a .json corpus must hold a list of rows")
            stop = len(rows) if stop is None else stop
            yield from ((i, rows[i]) for i in range(start, min(stop, len(rows))))
            return
        i = 0
        for line in f:
            if not line.strip():
                continue
            if i >= start and (stop is None or i < stop):
                yield i, _parse_line(line)
            i += 1
            if stop is not None and i >= stop:
                return


def _parse_line(line: bytes):
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError(INVALID_UTF8, f"byte {e.start} is not valid UTF-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RowError(MALFORMED_JSON, str(e))


def count_rows(path: str) -> int:
    """Number of rows in a file, without parsing JSONL lines (used to plan shards)."""
    fmt = file_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    if fmt == "json":
        return sum(1 for _ in iter_raw(path))
    with _open(path) as f:
        return sum(1 for line in f if line.strip())


def validate(raw, default_source: str, row_index: int | None = None) -> dict | Reject:
    """Canonical row or Reject for one raw row (never raises for bad data)."""
    try:
        if isinstance(raw, RowError):
            raise raw
        return canonicalize(raw, default_source)
    except RowError as e:
        given = raw.get("id") if isinstance(raw, dict) else None
        sample_id = str(given) if isinstance(given, str | int) else None
        if sample_id is None and row_index is not None:
            sample_id = f"{default_source}#row{row_index}"
        excerpt = raw.args[0] if isinstance(raw, RowError) else _excerpt(raw)
        return Reject(sample_id, default_source, e.reason, str(e), _excerpt(excerpt))


def iter_corpus(paths: str | Iterable[str]) -> Iterator[dict | Reject]:
    """Stream canonical rows and Rejects from files in order; later duplicate ids are rejected."""
    seen: set[str] = set()
    for path in expand_paths(paths):
        src = source_name(path)
        for i, raw in iter_raw(path):
            item = validate(raw, src, i)
            if isinstance(item, dict):
                if item["sample_id"] in seen:
                    msg = f"sample_id {item['sample_id']!r} already seen"
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


def _assistant_spans(text: str, messages: list[dict], closers: list[str]) -> list[tuple[int, int]]:
    """Character spans of assistant contents (plus the special token closing them) in text."""
    spans, cursor = [], 0
    for m in messages:
        start = text.find(m["content"], cursor)
        if start < 0:
            raise ValueError("chat template dropped or rewrote a message; cannot place loss mask")
        end = start + len(m["content"])
        cursor = end
        if m["role"] == "assistant":
            closer = next((c for c in closers if text.startswith(c, end)), "")
            end += len(closer)
            spans.append((start, end))
    return spans


def tokenize_messages(
    tokenizer, messages: list[dict], max_length: int, loss_on: str = "assistant"
) -> dict:
    """Tokenize a conversation with loss labels.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (-100 where no loss),
    ``truncated`` and ``n_tokens_full``. ``loss_on`` is 'assistant' (assistant content and
    its closing special token) or 'all'. Over-long samples keep their first ``max_length`` tokens.
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
    text = render_chat(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if loss_on == "all":
        mask = [True] * len(ids)
    else:
        closers = sorted(set(tokenizer.all_special_tokens), key=len, reverse=True)
        spans = _assistant_spans(text, messages, [c for c in closers if c])
        mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
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
