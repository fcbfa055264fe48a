"""Corpus rows: validation into one canonical shape, and the corpus as a stream of rows.

Every stage reads data through :func:`iter_corpus` / :func:`validate`: one canonical row
shape (``{sample_id, source, messages}``) from messages, ShareGPT or Alpaca rows. Bad rows
never raise: whatever goes wrong with one row (bad bytes, bad JSON, too-deep nesting, lone
surrogates, an odd shape) comes back as a :class:`Reject` with a reason from
:data:`REASON_DOCS` (qgate.rejects), so every input row is accounted for. Errors about a
whole file (missing, unsupported, a corrupt parquet footer) raise, naming the file, when the
paths are expanded and counted (qgate.readers): before any Ray work starts. Chat formatting
and tokenization are qgate.chat.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Iterator

from qgate.readers import count_rows, expand_paths, file_format, iter_raw, source_name
from qgate.rejects import (
    DUPLICATE_ID,
    DUPLICATE_TEXT,
    EXCERPT_CHARS,
    INVALID_UTF8,
    MALFORMED_JSON,
    MISSING_ASSISTANT,
    NEAR_DUPLICATE,
    NO_ANSWER_AFTER_TRUNCATION,
    NON_STRING_CONTENT,
    NON_TEXT_CONTENT,
    REASON_DOCS,
    REJECT_REASONS,
    SCORING_ERROR,
    TOKENIZATION_ERROR,
    UNKNOWN_ROLE,
    UNKNOWN_SHAPE,
    UNREADABLE_ROW,
    Reject,
    RowError,
    describe_error,
    utf8_safe,
)

__all__ = [
    "REASON_DOCS",
    "DUPLICATE_ID",
    "DUPLICATE_TEXT",
    "EXCERPT_CHARS",
    "INVALID_UTF8",
    "MALFORMED_JSON",
    "MISSING_ASSISTANT",
    "NEAR_DUPLICATE",
    "NON_STRING_CONTENT",
    "NON_TEXT_CONTENT",
    "NO_ANSWER_AFTER_TRUNCATION",
    "PART_SEPARATOR",
    "REJECT_REASONS",
    "ROLES",
    "Reject",
    "RowError",
    "SCORING_ERROR",
    "TEXT_PART_TYPES",
    "TOKENIZATION_ERROR",
    "UNKNOWN_ROLE",
    "UNKNOWN_SHAPE",
    "UNREADABLE_ROW",
    "canonicalize",
    "content_hash",
    "count_rows",
    "describe_error",
    "expand_paths",
    "file_format",
    "iter_corpus",
    "iter_raw",
    "read_corpus",
    "source_name",
    "to_messages",
    "utf8_safe",
    "validate",
    "write_jsonl",
]

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_SHAREGPT_ROLES |= {"system": "system", "chatgpt": "assistant", "bing": "assistant"}
# OpenAI-style content parts whose "text" is kept (Chat Completions and Responses API names).
TEXT_PART_TYPES = ("text", "input_text", "output_text")
# Text parts of one turn are joined with a newline, as vLLM's chat front end does: parts are
# usually separate paragraphs, and "" would glue the last word of one to the first of the next.
PART_SEPARATOR = "\n"


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


# ----------------------------------------------------------------------------- validation


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
        reason, detail = UNREADABLE_ROW, f"{UNREADABLE_ROW}: {describe_error(e)}"
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


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically (temp file + rename); returns the row count."""
    from qgate.atomic import atomic_path

    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
