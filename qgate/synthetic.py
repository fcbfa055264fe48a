"""The labelled synthetic corpus (demo, tests, benchmarks; the stand-in model is
qgate.stand_in).

:func:`generate_corpus` writes a seeded instruction corpus from task families with
verifiable answers. Pool rows carry a ``noise`` label (clean or one of NOISE_TYPES) and the
correct ``answer``, so a selection can be scored against the truth. These side columns are
for reports and evaluation only; no selection stage reads them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import string
from collections.abc import Callable, Iterable
from pathlib import Path

from qgate import data

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------
# Corpus

NOISE_TYPES = (
    "gibberish",
    "wrong_answer",
    "truncated",
    "copied",
    "repetition",
    "near_duplicate",
    "refusal",
)
# The low-value patterns any real pretrained LM has seen; mixed into the stand-in's pretraining
# so that perplexity does not look perfect on them (QUALITY_NOTES.md, lesson 1).
PRETRAIN_NOISE_TYPES = ("repetition", "refusal", "copied")
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, I cannot assist with that request.",
    "As an AI language model, I cannot answer that.",
    "Sorry, I am unable to provide that information.",
)
GIBBERISH_SYMBOLS = "#@%&*~^$"
SPLITS = ("pool", "target", "test", "pretrain")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_ANIMALS = ("fox", "owl", "lynx", "heron", "otter", "wolf", "crane", "badger", "hare", "seal")
_WORLD_SEED = 1234  # the fictional world is fixed: the same for every corpus seed
_WORLD_SIZE = 400


def _word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    """A pronounceable pseudo-word of lo..hi consonant-vowel syllables, e.g. 'tamori'."""
    n = rng.randint(lo, hi)
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n))


@functools.cache
def world() -> dict[str, dict[str, str]]:
    """The fixed fictional world: country -> {capital, currency, language, animal}."""
    rng = random.Random(_WORLD_SEED)
    countries: dict[str, dict[str, str]] = {}
    while len(countries) < _WORLD_SIZE:
        name = _word(rng, 2, 3).capitalize() + rng.choice(("ia", "land", "or", "an"))
        countries.setdefault(
            name,
            {
                "capital": _word(rng, 2, 3).capitalize(),
                "currency": _word(rng, 2, 2) + rng.choice(("mark", "crown", "dinar")),
                "language": _word(rng, 2, 2).capitalize() + rng.choice(("ish", "ese", "ic")),
                "animal": rng.choice(_ANIMALS),
            },
        )
    return countries


def _numbers(rng: random.Random, lo: int, hi: int) -> list[int]:
    return rng.sample(range(100), rng.randint(lo, hi))


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-")
    forms = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate: {a} {op} {b}")
    return rng.choice(forms).format(a=a, op=op, b=b), str(a + b if op == "+" else a - b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 2, 4)
    forms = ("Reverse the word '{w}'.", "Write '{w}' backwards.", "Spell {w} in reverse.")
    return rng.choice(forms).format(w=w), w[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    xs = _numbers(rng, 3, 6)
    forms = (
        "Sort these numbers in ascending order: {xs}",
        "Put in increasing order: {xs}",
        "Sort ascending: {xs}",
    )
    prompt = rng.choice(forms).format(xs=", ".join(map(str, xs)))
    return prompt, ", ".join(map(str, sorted(xs)))


def _count_letter(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 2, 4)
    c = rng.choice(w) if rng.random() < 0.85 else rng.choice(string.ascii_lowercase)
    forms = (
        "How many times does the letter '{c}' appear in '{w}'?",
        "Count the letter {c} in {w}.",
        "Number of '{c}' in '{w}'?",
    )
    return rng.choice(forms).format(c=c, w=w), str(w.count(c))


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(world()))
    forms = (
        "What is the capital of {c}?",
        "Name the capital city of {c}.",
        "Which city is the capital of {c}?",
    )
    return rng.choice(forms).format(c=country), world()[country]["capital"]


def _date_format(rng: random.Random) -> tuple[str, str]:
    d, m, y = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1900, 2099)
    forms = (
        "Convert {d:02d}/{m:02d}/{y} to YYYY-MM-DD.",
        "Rewrite the date {d:02d}/{m:02d}/{y} in ISO format.",
        "ISO form of {d:02d}/{m:02d}/{y}?",
    )
    return rng.choice(forms).format(d=d, m=m, y=y), f"{y:04d}-{m:02d}-{d:02d}"


_WORLD_QA_FORMS = {
    "currency": ("What currency is used in {c}?", "Name the money of {c}."),
    "language": ("Which language is spoken in {c}?", "What do people speak in {c}?"),
    "animal": ("What is the national animal of {c}?", "Name the animal symbol of {c}."),
}


def _world_qa(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(world()))
    key = rng.choice(sorted(_WORLD_QA_FORMS))
    return rng.choice(_WORLD_QA_FORMS[key]).format(c=country), world()[country][key]


def _uppercase(rng: random.Random) -> tuple[str, str]:
    s = " ".join(_word(rng) for _ in range(rng.randint(1, 3)))
    forms = ("Convert to uppercase: {s}", "Write '{s}' in capital letters.", "Uppercase this: {s}")
    return rng.choice(forms).format(s=s), s.upper()


def _max_list(rng: random.Random) -> tuple[str, str]:
    xs = _numbers(rng, 3, 7)
    forms = (
        "What is the largest number in: {xs}?",
        "Find the maximum of {xs}.",
        "Which is biggest: {xs}?",
    )
    return rng.choice(forms).format(xs=", ".join(map(str, xs))), str(max(xs))


def _count_items(rng: random.Random) -> tuple[str, str]:
    items = [_word(rng) for _ in range(rng.randint(2, 7))]
    forms = ("How many items are in this list: {xs}?", "Count the items: {xs}", "How many: {xs}?")
    return rng.choice(forms).format(xs=", ".join(items)), str(len(items))


# family name -> generator(rng) -> (user prompt, correct answer). The first three are the
# default target families.
_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "sort": _sort,
    "date_format": _date_format,
    "reverse": _reverse,
    "count_letter": _count_letter,
    "capital": _capital,
    "world_qa": _world_qa,
    "uppercase": _uppercase,
    "max_list": _max_list,
    "count_items": _count_items,
}
FAMILIES = tuple(_GENERATORS)


def _check_names(given: Iterable[str] | None, known: tuple[str, ...], what: str) -> tuple:
    names = known if given is None else tuple(given)
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise ValueError(f"unknown or empty {what}: {unknown or names}; choose from {known}")
    return names


def _draw(rng: random.Random, families: tuple, seen: set, min_answer: int = 1) -> tuple:
    """A new (family, prompt, answer) whose prompt is not in ``seen`` (which is updated).

    Families whose prompt space is used up are skipped by retrying, so large pools stay
    unique (the lookup families have a few thousand prompts only).
    """
    for _ in range(200):
        family = rng.choice(families)
        prompt, answer = _GENERATORS[family](rng)
        if prompt not in seen and len(answer) >= min_answer:
            seen.add(prompt)
            return family, prompt, answer
    raise ValueError(
        f"prompt space of families {families} is used up; ask for fewer rows or more families"
    )


def _wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: one number shifted, another value of the same world fact,
    or one letter changed."""
    numbers = list(re.finditer(r"\d+", answer))
    if numbers:
        m = rng.choice(numbers)
        old, delta = int(m.group()), rng.randint(1, 9)
        value = old - delta if old >= delta and rng.random() < 0.5 else old + delta
        new = str(value).zfill(len(m.group()))  # keeps date padding: 05 -> 08
        return answer[: m.start()] + new + answer[m.end() :]
    for key in ("capital", "currency", "language", "animal"):
        values = {c[key] for c in world().values()}
        if answer in values:
            return rng.choice(sorted(values - {answer}))
    pos = rng.choice([i for i, ch in enumerate(answer) if ch.isalpha()])
    ch = rng.choice([c for c in string.ascii_lowercase if c != answer[pos].lower()])
    ch = ch.upper() if answer[pos].isupper() else ch
    return answer[:pos] + ch + answer[pos + 1 :]


def _gibberish(rng: random.Random) -> str:
    chars = rng.choices(
        string.ascii_letters + string.digits + GIBBERISH_SYMBOLS, k=rng.randint(8, 30)
    )
    for _ in range(2):  # at least two symbols, so it can never be a valid answer
        chars[rng.randrange(len(chars))] = rng.choice(GIBBERISH_SYMBOLS)
    return "".join(chars)


def _repetition(answer: str, rng: random.Random) -> str:
    words = answer.split()
    chunk = words[: rng.randint(1, min(3, len(words)))]
    return " ".join(chunk * rng.randint(4, 8))


def _near_copy(prompt: str, rng: random.Random) -> str:
    """The prompt with a tiny whitespace or case change (never identical)."""
    if rng.random() < 0.5 and prompt[0].isalpha():
        return prompt[0].swapcase() + prompt[1:]
    spaces = [i for i, ch in enumerate(prompt) if ch == " "]
    i = rng.choice(spaces)
    return prompt[:i] + " " + prompt[i:]


def _pick_other(candidates: list[int], i: int, rng: random.Random, ok=lambda j: True) -> int:
    """A random candidate index other than ``i`` that passes ``ok``."""
    for _ in range(100):
        j = rng.choice(candidates)
        if j != i and ok(j):
            return j
    raise ValueError("no other row to copy from; generate more rows or lower the noise ratio")


def _make_rows(
    split: str, labels: list[str], rng: random.Random, families: tuple, seen: set
) -> list[dict]:
    """Rows for one split: ``labels[i]`` is row i's noise label."""
    base = [_draw(rng, families, seen, 2 if lab == "truncated" else 1) for lab in labels]
    rows = [
        {
            "id": f"{split}-{i:06d}",
            "source": f"synth/{family}",
            "family": family,
            "noise": "clean",
            "answer": answer,
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ],
        }
        for i, (family, prompt, answer) in enumerate(base)
    ]
    # Copies are taken from rows whose prompt and answer stay as drawn, so the source is
    # findable in the split; near-duplicates prefer clean sources.
    donors = [i for i, lab in enumerate(labels) if lab != "near_duplicate"]
    clean = [i for i, lab in enumerate(labels) if lab == "clean"] or donors
    for i in sorted(range(len(rows)), key=lambda i: labels[i] == "near_duplicate"):
        row, label = rows[i], labels[i]
        answer, prompt = row["answer"], row["messages"][0]["content"]
        if label == "clean":
            continue
        if label == "gibberish":
            content = _gibberish(rng)
        elif label == "wrong_answer":
            content = _wrong_answer(answer, rng)
        elif label == "truncated":
            content = answer[: rng.randint(1, len(answer) - 1)].rstrip()
        elif label == "repetition":
            content = _repetition(answer, rng)
        elif label == "refusal":
            content = rng.choice(REFUSALS)
        elif label == "copied":
            donor = rows[_pick_other(donors, i, rng, lambda j, a=answer: rows[j]["answer"] != a)]
            content = donor["answer"] if rng.random() < 0.5 else donor["messages"][0]["content"]
        elif label == "near_duplicate":
            src = rows[_pick_other(clean, i, rng)]
            seen.discard(prompt)
            prompt = _near_copy(src["messages"][0]["content"], rng)
            seen.add(prompt)
            content = src["messages"][1]["content"]
            row.update(source=src["source"], family=src["family"], answer=src["answer"])
        else:
            raise ValueError(f"unknown noise type {label!r}; choose from {NOISE_TYPES}")
        row["noise"] = label
        row["messages"] = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": content},
        ]
    return rows


def _labels(n: int, n_noisy: int, noise_types: tuple, rng: random.Random) -> list[str]:
    """``n_noisy`` noise labels spread evenly over the types, the rest clean, shuffled."""
    labels = [noise_types[i % len(noise_types)] for i in range(n_noisy)] + ["clean"] * (n - n_noisy)
    rng.shuffle(labels)
    return labels


def generate_corpus(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_pool: int = 2000,
    n_target: int = 200,
    n_test: int = 200,
    n_pretrain: int = 2000,
    noise_ratio: float = 0.3,
    families: Iterable[str] | None = None,
    noise_types: Iterable[str] | None = None,
    pretrain_noise_ratio: float = 0.25,
    target_families: Iterable[str] | None = None,
) -> dict[str, str]:
    """Write pool/target/test/pretrain JSONL files; return {split: path}.

    pool: ``noise_ratio`` of rows noisy, spread evenly over ``noise_types``. target: clean rows
    from ``target_families`` (default the first three of ``families``). test: clean rows for
    exact-match eval. pretrain: clean rows plus ``pretrain_noise_ratio * n_pretrain`` labelled
    rows of PRETRAIN_NOISE_TYPES, the base model's "web text". User prompts are unique across
    all splits, so test never leaks into pool or pretrain. Deterministic in every argument;
    each split has its own random stream, so test and pretrain do not change with ``n_pool``.
    """
    families = _check_names(families, FAMILIES, "families")
    noise_types = _check_names(noise_types, NOISE_TYPES, "noise_types")
    target_families = _check_names(target_families or families[:3], families, "target_families")
    for name, ratio in (
        ("noise_ratio", noise_ratio),
        ("pretrain_noise_ratio", pretrain_noise_ratio),
    ):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {ratio}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    n_extra = round(n_pretrain * pretrain_noise_ratio)
    plan = (  # order matters: earlier splits claim prompts first
        ("test", n_test, 0, NOISE_TYPES, families),
        ("target", n_target, 0, NOISE_TYPES, target_families),
        ("pretrain", n_pretrain + n_extra, n_extra, PRETRAIN_NOISE_TYPES, families),
        ("pool", n_pool, round(n_pool * noise_ratio), noise_types, families),
    )
    paths = {}
    for split, n, n_noisy, types, fams in plan:
        rng = random.Random(f"qgate-synthetic:{seed}:{split}")
        rows = _make_rows(split, _labels(n, n_noisy, types, rng), rng, fams, seen)
        paths[split] = str(out / f"{split}.jsonl")
        data.write_jsonl(paths[split], rows)
    return {split: paths[split] for split in SPLITS}


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by :func:`generate_corpus` (side columns included)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
