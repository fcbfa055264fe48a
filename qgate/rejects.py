"""Why a row was not used: the reject reasons, the row error and the reject record.

Every stage (ingest, dedup, scoring, training, Serve) refuses rows with one of these stable
reason strings; they end up in parquet files and API replies.
"""

from __future__ import annotations

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

EXCERPT_CHARS = 200


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


def describe_error(e: BaseException) -> str:
    """``Type: message`` of an exception, for a reject's detail (never raises itself)."""
    try:
        return f"{type(e).__name__}: {e}"
    except Exception:
        return type(e).__name__
