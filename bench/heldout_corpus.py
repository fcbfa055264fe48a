"""A held-out corpus for bench/quality.py (corpus C): other task families, other sources and
other noise than ``qgate.synthetic``, written so that no choice made on corpora A and B was
made on it.

Families (verifiable, exact-match answers): word_length, spell, last_word (source
``mix/text``), compare, hours_to_minutes, double (``mix/numbers``), acronym, json_value
(``mix/structured``). Sources hold several families each, as a real corpus's dataset names do.

Noise kinds, none of them made by qgate's contrast negatives (swap, truncate, repeat, extend)
nor by ``qgate.synthetic``:
- ``chatter``: the right answer wrapped in hedging assistant boilerplate;
- ``off_topic``: a fluent sentence about something else;
- ``markup``: the right answer inside HTML or JSON debris;
- ``placeholder``: a template left unfilled (``{{answer}}``, ``[insert answer here]``, ...);
- ``encoded``: the right answer percent-, base64- or hex-encoded;
- ``contradiction``: the right answer, then a claim that it is something else.

Rows carry the columns bench/quality.py reads: ``id``, ``source``, ``family``, ``noise``,
``answer`` and ``messages``.
"""

from __future__ import annotations

import base64
import functools
import os
import random

from qgate import data

HELDOUT_FAMILIES = (
    "word_length",
    "compare",
    "acronym",
    "spell",
    "last_word",
    "hours_to_minutes",
    "double",
    "json_value",
)
HELDOUT_NOISE = ("chatter", "off_topic", "markup", "placeholder", "encoded", "contradiction")
SOURCES = {
    "word_length": "mix/text",
    "spell": "mix/text",
    "last_word": "mix/text",
    "compare": "mix/numbers",
    "hours_to_minutes": "mix/numbers",
    "double": "mix/numbers",
    "acronym": "mix/structured",
    "json_value": "mix/structured",
}

_WORD_TEXT = (
    "apple river stone garden window candle forest bridge market silver orange pencil "
    "rocket basket mirror castle dragon harbor island jacket kitten ladder meadow needle "
    "ocean palace rabbit saddle tiger violin wagon yellow anchor butter cactus dinner engine "
    "feather guitar hammer igloo jungle kettle lemon magnet napkin oyster pepper quilt "
    "ribbon sandal tunnel umbrella valley walnut zipper blanket cookie desert falcon ginger "
    "helmet insect jigsaw koala lantern marble nectar olive pirate quartz radish spider "
    "tomato unicorn velvet whistle yogurt breeze cloud frost thunder planet comet shadow "
    "summer winter autumn spring copper bronze marble cotton linen timber meadow canyon"
)
WORDS = tuple(dict.fromkeys(_WORD_TEXT.split()))
NAMES = ("tom", "ana", "li", "omar", "sara", "ivan", "maya", "ken", "zoe", "raj", "eva", "leo")
CITIES = ("lima", "oslo", "rome", "kyiv", "doha", "quito", "bern", "riga", "seoul", "cairo")
_CHATTER = (
    "Great question! I believe the answer is {a}, but please double-check it yourself.",
    "Sure thing! After thinking about it carefully, I would say {a}. Let me know if there "
    "is anything else I can help you with today!",
    "Hmm, that's a tricky one. It might be {a}, although I'm not entirely certain.",
    "Thanks for asking! The answer should be {a}. I hope this helps, and have a nice day!",
)
_MARKUP = (
    '<div class="answer"><span>{a}</span></div>&nbsp;<!-- generated -->',
    '{{"output": "{a}", "status": 200, "error": null}}',
    "<p><b>Answer:</b> {a}</p><br/><br/>",
    "&lt;answer&gt;{a}&lt;/answer&gt;",
)
_PLACEHOLDER = (
    "{{answer}}",
    "[insert answer here]",
    "<ANSWER>",
    "TODO: fill in the {f} answer",
    "${{{f}_output}}",
    "N/A",
    "<{f} response goes here>",
)
_SUBJECTS = ("The city council", "My neighbour", "The museum", "Our team", "The old bakery")
_VERBS = ("announced", "postponed", "celebrated", "reviewed", "quietly cancelled")
_OBJECTS = ("a new parking plan", "the summer festival", "its opening hours", "the budget")
_TAILS = ("after a long meeting.", "on Tuesday.", "despite the rain.", "for the third time.")


def _word_length(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    q = rng.choice(("How many letters are in the word '{w}'?", "Count the letters in '{w}'."))
    return q.format(w=w), str(len(w))


def _compare(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 1000), 2)
    if rng.random() < 0.5:
        return f"Which is larger, {a} or {b}?", str(max(a, b))
    return f"Which is smaller, {a} or {b}?", str(min(a, b))


def _acronym(rng: random.Random) -> tuple[str, str]:
    ws = rng.sample(WORDS, rng.randint(3, 4))
    return f"Write the acronym of: {' '.join(ws)}", "".join(w[0] for w in ws).upper()


def _spell(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    sep = rng.choice(("-", " "))
    how = "dashes" if sep == "-" else "spaces"
    return f"Spell '{w}' with {how} between the letters.", sep.join(w)


def _last_word(rng: random.Random) -> tuple[str, str]:
    ws = rng.sample(WORDS, rng.randint(4, 7))
    return f"What is the last word of: {' '.join(ws)}", ws[-1]


def _hours_to_minutes(rng: random.Random) -> tuple[str, str]:
    h, m = rng.randint(1, 48), rng.randint(0, 59)
    if m == 0:
        return f"How many minutes are in {h} hours?", str(60 * h)
    return f"How many minutes are in {h} hours and {m} minutes?", str(60 * h + m)


def _double(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(2, 2000)
    return rng.choice(("What is twice {n}?", "Double the number {n}.")).format(n=n), str(2 * n)


def _json_value(rng: random.Random) -> tuple[str, str]:
    rec = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES)}
    key = rng.choice(sorted(rec))
    text = ", ".join(
        f'"{k}": ' + (f'"{v}"' if isinstance(v, str) else str(v)) for k, v in rec.items()
    )
    return f'In {{{text}}}, what is the value of "{key}"?', str(rec[key])


GENERATORS = {
    "word_length": _word_length,
    "compare": _compare,
    "acronym": _acronym,
    "spell": _spell,
    "last_word": _last_word,
    "hours_to_minutes": _hours_to_minutes,
    "double": _double,
    "json_value": _json_value,
}


def _other_number(answer: str, rng: random.Random) -> str:
    """A different value of the answer's kind (for ``contradiction``)."""
    if answer.isdigit():
        return str(int(answer) + rng.choice((-3, -2, -1, 1, 2, 3)) * max(1, len(answer) // 2))
    return rng.choice([w for w in WORDS if w != answer])


def corrupt(kind: str, answer: str, family: str, rng: random.Random) -> str:
    """The assistant turn of a row of noise ``kind`` whose right answer is ``answer``."""
    if kind == "chatter":
        return rng.choice(_CHATTER).format(a=answer)
    if kind == "off_topic":
        parts = (_SUBJECTS, _VERBS, _OBJECTS, _TAILS)
        return " ".join(rng.choice(p) for p in parts)
    if kind == "markup":
        return rng.choice(_MARKUP).format(a=answer)
    if kind == "placeholder":
        return rng.choice(_PLACEHOLDER).format(f=family)
    if kind == "encoded":
        how = rng.randrange(3)
        if how == 0:
            return "".join(f"%{b:02X}" for b in answer.encode())
        if how == 1:
            return base64.b64encode(answer.encode()).decode()
        return answer.encode().hex()
    if kind == "contradiction":
        return f"{answer}. Actually, no: the correct answer is {_other_number(answer, rng)}."
    raise ValueError(f"unknown noise kind {kind!r}; choose from {HELDOUT_NOISE}")


def _rows(split: str, n: int, noisy: int, families: tuple, seen: set, rng) -> list[dict]:
    kinds = [HELDOUT_NOISE[i % len(HELDOUT_NOISE)] for i in range(noisy)]
    kinds += ["clean"] * (n - noisy)
    rng.shuffle(kinds)
    rows = []
    for i, kind in enumerate(kinds):
        for _ in range(500):
            family = rng.choice(families)
            prompt, answer = GENERATORS[family](rng)
            if prompt not in seen:
                break
        else:
            raise ValueError(f"prompt space of {families} used up at {split} row {i}")
        seen.add(prompt)
        content = answer if kind == "clean" else corrupt(kind, answer, family, rng)
        rows.append(
            chat_row(f"{split}-{i:06d}", SOURCES[family], family, kind, answer, prompt, content)
        )
    return rows


def chat_row(
    row_id: str, source: str, family: str, kind: str, answer: str, prompt: str, content: str
) -> dict:
    """One labelled row in the columns bench/quality.py reads (shared by corpora C and D)."""
    return {
        "id": row_id,
        "source": source,
        "family": family,
        "noise": kind,
        "answer": answer,
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": content},
        ],
    }


def weighted_rows(
    split: str,
    n: int,
    noisy: int,
    families: tuple,
    seen: set,
    rng: random.Random,
    *,
    noise: tuple,
    weights: dict,
    sources: dict,
    generators: dict,
    corrupt,
) -> list[dict]:
    """Rows of one split for a corpus with unbalanced families (corpora D, E and F).

    ``noisy`` of ``n`` rows are spread evenly over the ``noise`` kinds and shuffled; each row's
    family is drawn with ``weights``, its task from ``generators[family](rng)`` (an item with
    ``prompt`` and ``answer``) until the prompt is new, its source from ``sources[family]``
    (``((source, weight), ...)``) and a noisy row's answer from ``corrupt(kind, item, rng)``
    (or its prompt and answer, where ``corrupt`` returns a pair).
    """
    kinds = [noise[i % len(noise)] for i in range(noisy)]
    kinds += ["clean"] * (n - noisy)
    rng.shuffle(kinds)
    family_weights = [weights[f] for f in families]
    rows = []
    for i, kind in enumerate(kinds):
        family = rng.choices(families, family_weights)[0]
        for _ in range(1000):
            item = generators[family](rng)
            if item.prompt not in seen:
                break
        else:
            raise ValueError(f"prompt space of {family} used up at {split} row {i}")
        seen.add(item.prompt)
        names, source_weights = zip(*sources[family])
        source = rng.choices(names, source_weights)[0]
        prompt, content = item.prompt, item.answer
        if kind != "clean":  # corrupt gives the assistant turn, or (user turn, assistant turn)
            content = corrupt(kind, item, rng)
            if isinstance(content, tuple):
                prompt, content = content
        rows.append(
            chat_row(f"{split}-{i:06d}", source, family, kind, item.answer, prompt, content)
        )
    return rows


def write_weighted_corpus(
    out_dir: str, stream: str, families: tuple, known: tuple, sizes: dict, **tables
) -> dict[str, str]:
    """Write a corpus with unbalanced families (D, E): check ``families`` against ``known``,
    then ``write_splits`` with ``weighted_rows`` over ``tables`` (noise, weights, sources,
    generators, corrupt); return {split: path}."""
    families = tuple(families)
    unknown = sorted(set(families) - set(known))
    if unknown or not families:
        raise ValueError(f"unknown or empty families {unknown or families}")
    return write_splits(
        out_dir, stream, sizes, families, functools.partial(weighted_rows, **tables)
    )


def write_splits(out_dir: str, stream: str, sizes: dict, families: tuple, rows) -> dict[str, str]:
    """Write test, target, pretrain (empty) and pool JSONL in that order; return {split: path}.

    ``sizes`` holds n_test, n_target, n_pool and noise_ratio; each split draws from its own
    ``random.Random(f"{stream}:{split}")`` and ``rows(split, n, noisy, families, seen, rng)``
    keeps prompts unique across splits through the shared ``seen`` set. Target rows come
    from the first three families.
    """
    os.makedirs(out_dir, exist_ok=True)
    seen: set[str] = set()
    plan = (
        ("test", sizes["n_test"], 0, families),
        ("target", sizes["n_target"], 0, families[:3]),
        ("pretrain", 0, 0, families),
        ("pool", sizes["n_pool"], round(sizes["n_pool"] * sizes["noise_ratio"]), families),
    )
    paths = {}
    for split, n, noisy, fams in plan:
        rng = random.Random(f"{stream}:{split}")
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        data.write_jsonl(paths[split], rows(split, n, noisy, fams, seen, rng))
    return paths


def generate_heldout(
    out_dir: str,
    *,
    seed: int = 2,
    n_pool: int = 2000,
    n_target: int = 100,
    n_test: int = 200,
    noise_ratio: float = 0.3,
    families: tuple[str, ...] = HELDOUT_FAMILIES,
) -> dict[str, str]:
    """Write pool/target/test/pretrain JSONL files of corpus C; return {split: path}.

    Same contract as ``qgate.synthetic.generate_corpus`` (unique prompts across splits, test
    and target clean, target from the first three families); pretrain is empty, since C is
    only run on a real base model. Deterministic in every argument.
    """
    sizes = {"n_test": n_test, "n_target": n_target, "n_pool": n_pool, "noise_ratio": noise_ratio}
    return write_splits(out_dir, f"qgate-heldout:{seed}", sizes, families, _rows)
