"""Chat formatting: a row's messages rendered with the model's chat template, and the token
labels that put the loss (and the score) on the assistant's answer only.
"""

from __future__ import annotations

from functools import lru_cache

from qgate.rejects import TOKENIZATION_ERROR, RowError, describe_error

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
    ``truncated``, ``n_tokens_full`` and ``n_prompt`` (the tokens before the first answer
    token, whatever ``loss_on``: what the prompt embedding pools over; the whole text for a
    slow tokenizer under 'all', which gives no offsets). ``loss_on`` is 'assistant' (every
    token overlapping an assistant content or its closing special token) or 'all'. Over-long
    samples keep their first ``max_length`` tokens. A chat template that raises on this conversation, or loses a
    message, raises ``RowError(tokenization_error)``; a broken tokenizer raises as it is.
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
    try:
        text = render_chat(tokenizer, messages)
    except Exception as e:
        raise RowError(TOKENIZATION_ERROR, f"chat template failed: {describe_error(e)}") from e
    offsets = loss_on != "all" or getattr(tokenizer, "is_fast", False)  # slow: no offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    ids = list(enc["input_ids"])
    answer = [False] * len(ids)
    if offsets:
        spans = _assistant_spans(tokenizer, text, messages)
        answer = [_in_loss(a, b, spans) for a, b in enc["offset_mapping"]]
    mask = [True] * len(ids) if loss_on == "all" else answer
    n_full = len(ids)
    truncated = n_full > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    n_prompt = next((i for i, m in enumerate(answer[: len(ids)]) if m), len(ids))
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)],
        "truncated": truncated,
        "n_tokens_full": n_full,
        "n_prompt": n_prompt,
    }


def answer_only(messages: list[dict]) -> list[dict]:
    """The assistant turns alone: the context-free input that IFD compares against."""
    return [m for m in messages if m["role"] == "assistant"]


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """A model directory's tokenizer, with eos as the pad token when it has none: the one
    tokenizer loader of every stage (cached per path; callers do not modify it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
