"""Negatives made by corrupting pool rows: the training signal of the ``contrast`` gate loss.

A corpus holds no quality labels, but it is easy to make rows that are certainly worse than
the one they came from. Each corruption breaks one property that every good answer has:

- ``swap``: the answer of another row (the answer no longer fits its prompt);
- ``truncate``: the answer cut at 20-70% of its words (incomplete);
- ``repeat``: the first few words of the answer repeated to its length (degenerate);
- ``shuffle``: the answer's words in random order (incoherent);
- ``char_noise``: a third of the answer's letters replaced by random ones (not language);
- ``extend``: the answer followed by another row's answer (it runs on past its end, off topic);
- ``prompt``: another row's user turn as the answer (fluent and complete, but no answer).

``shuffle`` and ``char_noise`` make text that is not language; a gate trained on them learns
in part "fluent is real", which ranks fluent noise (a boilerplate refusal, an answer to
another question) above real rows. ``extend`` is made of real text, and it teaches what a
good answer does that such noise does not: it ends where its prompt is answered.

The gate is trained to open on real rows and close on their corrupted copies. What it learns
is measured on noise kinds that no corruption constructs (bench/quality.py reports them
apart), so a good score there is not just the corruptions played back.
"""

from __future__ import annotations

import random
import string

CORRUPTIONS = ("swap", "truncate", "repeat", "shuffle", "char_noise", "extend", "prompt")
DEFAULT_CORRUPTIONS = ("swap", "truncate", "repeat", "extend")
"""The contrast warmup's default negatives: each is made of real answer text, shortened
(truncate), lengthened (extend, repeat) or moved to another prompt (swap), so what a gate
learns is whether an answer fits and completes its prompt rather than whether it is fluent.
On SmolLM2 they generalise best to the noise kinds none of them builds (BENCHMARKS.md,
"Negatives made of real text"); shuffle and char_noise remain options."""
DONOR_KINDS = ("swap", "extend", "prompt")
"""The corruptions that take text from another row (the donor)."""


def _answer_indices(messages: list[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def _donor_text(donor: dict, kind: str) -> str:
    """What a donor row gives: its last answer, or (``prompt``) the user turn before it."""
    messages = donor["messages"]
    i = _answer_indices(messages)[-1]
    if kind == "prompt":
        turns = [m["content"] for m in messages[:i] if m["role"] == "user"]
        return turns[-1] if turns else messages[i]["content"]
    return messages[i]["content"]


def _truncate(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    if len(words) < 2:
        return text[: max(1, len(text) // 2)]
    keep = max(1, int(len(words) * rng.uniform(0.2, 0.7)))
    return " ".join(words[:keep])


def _repeat(text: str, rng: random.Random) -> str:
    words = text.split()
    if not words:
        return text
    head = words[: max(1, min(len(words), rng.randint(1, 4)))]
    out: list[str] = []
    while len(out) < max(len(words), 2 * len(head)):
        out += head
    return " ".join(out[: max(len(words), 2 * len(head))])


def _shuffle(text: str, rng: random.Random) -> str:
    words = text.split()
    if len(words) < 3:
        return _char_noise(text, rng)
    for _ in range(5):  # a shuffle that equals the original is no negative
        rng.shuffle(words)
        if " ".join(words) != " ".join(text.split()):
            break
    return " ".join(words)


def _char_noise(text: str, rng: random.Random) -> str:
    chars = list(text)
    letters = [i for i, c in enumerate(chars) if c.isalnum()] or list(range(len(chars)))
    for i in rng.sample(letters, max(1, len(letters) // 3)):
        chars[i] = rng.choice(string.ascii_letters + string.digits)
    return "".join(chars)


def corrupt(row: dict, kind: str, rng: random.Random, donor: dict | None = None) -> dict:
    """A corrupted copy of a canonical row (only its last assistant turn changes).

    ``donor`` is the row whose answer ``swap`` and ``extend`` take (``prompt``: its user
    turn). The copy's sample_id records where it came from (``<id>~<kind>``), so negatives
    never collide with real rows.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {kind!r}")
    messages = [dict(m) for m in row["messages"]]
    i = _answer_indices(messages)[-1]
    text = messages[i]["content"]
    if kind in DONOR_KINDS:
        if donor is None:
            raise ValueError(f"{kind} needs a donor row")
        other = _donor_text(donor, kind)
        new = f"{text.rstrip()} {other.strip()}" if kind == "extend" else other
    else:
        new = {"truncate": _truncate, "repeat": _repeat, "shuffle": _shuffle}.get(
            kind, _char_noise
        )(text, rng)
    if not new.strip() or new == text:
        new = _char_noise(text, rng) if text.strip() else "x"
    messages[i]["content"] = new
    return {
        "sample_id": f"{row['sample_id']}~{kind}",
        "source": row["source"],
        "messages": messages,
    }


def make_negatives(rows: list[dict], kinds: list[str], seed: int) -> list[dict]:
    """One corrupted copy of every row, kinds assigned round-robin after a seeded shuffle.

    Deterministic in (rows by sample_id, kinds, seed), so a resumed warmup sees the same data.
    Donors (``swap``, ``extend``) are other rows of the pool, drawn with the same seed.
    """
    if not kinds:
        raise ValueError("contrast needs at least one corruption kind")
    rows = sorted(rows, key=lambda r: r["sample_id"])
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    out = []
    for j, i in enumerate(order):
        kind = kinds[j % len(kinds)]
        donor = None
        if kind in DONOR_KINDS:
            if len(rows) < 2:
                kind = "char_noise"
            else:
                d = rng.randrange(len(rows) - 1)
                donor = rows[d if d < i else d + 1]
        out.append(corrupt(rows[i], kind, rng, donor))
    return out
