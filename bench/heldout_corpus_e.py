"""A third held-out corpus for bench/quality.py (corpus E): task families, sources and noise
kinds that none of corpora A-D, nor qgate's contrast negatives, has.

Written on 2026-12-07 after the results on A-D were known (unlike D, by the session that
chose the default), and run once, after the choice on A-D was written down. The noise kinds
were picked as failures common in real instruction data, not by how any ranking scores them.

Families (verifiable, exact-match answers), with their draw weights: roman (3, to and from
Roman numerals), count_vowels (3), remainder (3), next_term (2, the next term of an
arithmetic or geometric sequence), month_shift (2), antonym (1, a fixed table), clock_add
(1, a 24-hour time plus or minus minutes) and letter_position (1, from the start or the end
of the alphabet). The first three are the default target families.

Sources do not map 1:1 to families: ``crowd/v3`` holds roman and antonym; ``gh/evals``
count_vowels, letter_position and half of remainder; ``school/drills`` the other half of
remainder and next_term; ``corp/support`` month_shift and clock_add.

Noise kinds:
- ``wrong_rule``: the answer of a related but wrong procedure, in the asked-for form
  (additive Roman numerals, consonants counted instead of vowels, the quotient instead of
  the remainder, the month shifted the wrong way, a synonym for an antonym, ...);
- ``template_leak``: the right answer inside another chat format's scaffolding
  (``### Response:``, ``[/INST]``, ``Assistant:``), left in by a bad conversion;
- ``homoglyph``: the right answer in look-alike characters (Cyrillic letters, full-width
  digits) that read the same and tokenize otherwise;
- ``clarify``: a clarifying question back to the user instead of an answer;
- ``unanswerable``: a claim that the question cannot be answered as asked;
- ``citation``: the right answer followed by a made-up source or link.

Rows carry the columns bench/quality.py reads: ``id``, ``source``, ``family``, ``noise``,
``answer`` and ``messages``.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from bench.heldout_corpus import WORDS, write_weighted_corpus
from bench.heldout_corpus_d import PREFIX_WORDS

HELDOUT_E_FAMILIES = (
    "roman",
    "count_vowels",
    "remainder",
    "next_term",
    "month_shift",
    "antonym",
    "clock_add",
    "letter_position",
)
HELDOUT_E_NOISE = (
    "wrong_rule",
    "template_leak",
    "homoglyph",
    "clarify",
    "unanswerable",
    "citation",
)
# family -> draw weight
WEIGHTS = {
    "roman": 3,
    "count_vowels": 3,
    "remainder": 3,
    "next_term": 2,
    "month_shift": 2,
    "antonym": 1,
    "clock_add": 1,
    "letter_position": 1,
}
# family -> ((source, weight), ...)
SOURCES = {
    "roman": (("crowd/v3", 1),),
    "antonym": (("crowd/v3", 1),),
    "count_vowels": (("gh/evals", 1),),
    "letter_position": (("gh/evals", 1),),
    "remainder": (("gh/evals", 1), ("school/drills", 1)),
    "next_term": (("school/drills", 1),),
    "month_shift": (("corp/support", 1),),
    "clock_add": (("corp/support", 1),),
}

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
# word: (antonym, synonym)
ANTONYMS = {
    "hot": ("cold", "warm"),
    "big": ("small", "large"),
    "fast": ("slow", "quick"),
    "happy": ("sad", "glad"),
    "early": ("late", "prompt"),
    "open": ("closed", "ajar"),
    "full": ("empty", "filled"),
    "strong": ("weak", "sturdy"),
    "rich": ("poor", "wealthy"),
    "heavy": ("light", "weighty"),
    "ancient": ("modern", "old"),
    "brave": ("cowardly", "bold"),
    "wide": ("narrow", "broad"),
    "loud": ("quiet", "noisy"),
    "wet": ("dry", "damp"),
    "clean": ("dirty", "spotless"),
    "soft": ("hard", "gentle"),
    "tall": ("short", "high"),
    "friend": ("enemy", "companion"),
    "begin": ("end", "start"),
    "accept": ("reject", "take"),
    "increase": ("decrease", "raise"),
    "victory": ("defeat", "win"),
    "arrive": ("depart", "reach"),
    "remember": ("forget", "recall"),
    "buy": ("sell", "purchase"),
    "love": ("hate", "adore"),
    "win": ("lose", "triumph"),
    "question": ("answer", "query"),
    "visible": ("invisible", "apparent"),
    "generous": ("stingy", "giving"),
    "ordinary": ("extraordinary", "common"),
    "cheap": ("expensive", "inexpensive"),
    "smooth": ("rough", "even"),
    "simple": ("complex", "easy"),
    "polite": ("rude", "courteous"),
    "sharp": ("blunt", "keen"),
    "shallow": ("deep", "superficial"),
    "maximum": ("minimum", "most"),
    "inside": ("outside", "within"),
    "above": ("below", "over"),
    "forward": ("backward", "ahead"),
    "major": ("minor", "main"),
    "ascend": ("descend", "climb"),
    "expand": ("contract", "grow"),
    "include": ("exclude", "contain"),
    "permanent": ("temporary", "lasting"),
    "public": ("private", "open"),
    "rare": ("common", "scarce"),
    "honest": ("dishonest", "truthful"),
}
VOWELS = set("aeiou")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOWEL_WORDS = tuple(dict.fromkeys(WORDS + PREFIX_WORDS))
_ROMAN = (
    (1000, "M"),
    (900, "CM"),
    (500, "D"),
    (400, "CD"),
    (100, "C"),
    (90, "XC"),
    (50, "L"),
    (40, "XL"),
    (10, "X"),
    (9, "IX"),
    (5, "V"),
    (4, "IV"),
    (1, "I"),
)
_ROMAN_VALUE = {"M": 1000, "D": 500, "C": 100, "L": 50, "X": 10, "V": 5, "I": 1}
_LEAKS = (
    "### Response:\n{a}\n\n### Instruction:",
    "[/INST] {a} </s>",
    "Assistant: {a}\nUser:",
    "<s>[INST] {a} [/INST]",
    "### Assistant: {a}",
)
# Latin letter or digit -> a look-alike that reads the same
_HOMOGLYPHS = {
    **dict(zip("aceopxyABCEHKMOPTX", "асеорхуАВСЕНКМОРТХ", strict=True)),
    **{str(d): chr(0xFF10 + d) for d in range(10)},
    "i": "і",
    "I": "І",
    "V": "Ѵ",
}
_CLARIFY = (
    "Could you clarify what you mean before I answer?",
    "Do you want the answer in a particular format?",
    "Before I answer: is this for a class or for work? It may change the answer.",
    "Can you give me a bit more context first?",
    "Which convention should I use here?",
)
_UNANSWERABLE = (
    "This cannot be determined from the information given.",
    "There is not enough information to answer that.",
    "That question has no single correct answer.",
    "It depends on the context, so I can't give a definite answer.",
)
_CITATIONS = (
    "{a} (Source: Wikipedia)",
    "{a} [1]\n\n[1] https://en.wikipedia.org/wiki/Special:Random",
    "{a}. See https://www.example-answers.net/q/{n} for details.",
    "{a} (Smith et al., 2019)",
    "{a} — according to the official documentation.",
)


class Item(NamedTuple):
    """One drawn task: the prompt, its answer, and the answer of a related wrong rule."""

    prompt: str
    answer: str
    wrong_rule: str


def to_roman(n: int) -> str:
    """Standard (subtractive) Roman numeral of 1 <= n < 4000."""
    out = []
    for value, symbol in _ROMAN:
        count, n = divmod(n, value)
        out.append(symbol * count)
    return "".join(out)


def _additive_roman(n: int) -> str:
    """Roman numeral without subtraction (4 -> IIII, 90 -> LXXXX)."""
    out = []
    for value, symbol in _ROMAN:
        if len(symbol) == 1:
            count, n = divmod(n, value)
            out.append(symbol * count)
    return "".join(out)


def _roman(rng: random.Random) -> Item:
    while True:
        n = rng.randint(1, 399)
        r = to_roman(n)
        if r != _additive_roman(n):  # the wrong rule must give another answer
            break
    if rng.random() < 0.5:
        forms = ("Write {n} in Roman numerals.", "What is {n} as a Roman numeral?", "{n} in Roman?")
        return Item(rng.choice(forms).format(n=n), r, _additive_roman(n))
    forms = (
        "What number is the Roman numeral {r}?",
        "Convert {r} to an Arabic number.",
        "Roman {r} = ?",
    )
    summed = str(sum(_ROMAN_VALUE[c] for c in r))  # read without subtraction
    return Item(rng.choice(forms).format(r=r), str(n), summed)


def _count_vowels(rng: random.Random) -> Item:
    while True:
        w = rng.choice(VOWEL_WORDS)
        vowels = sum(c in VOWELS for c in w)
        if vowels != len(w) - vowels:
            break
    forms = (
        "How many vowels are in the word '{w}'?",
        "Count the vowels in {w}.",
        "Number of vowels (a, e, i, o, u) in '{w}'?",
    )
    return Item(rng.choice(forms).format(w=w), str(vowels), str(len(w) - vowels))


def _remainder(rng: random.Random) -> Item:
    while True:
        b = rng.randint(3, 12)
        a = rng.randint(b + 1, 150)
        if a % b != a // b:
            break
    forms = (
        "What is the remainder when {a} is divided by {b}?",
        "{a} mod {b} = ?",
        "Find the remainder of {a} ÷ {b}.",
    )
    return Item(rng.choice(forms).format(a=a, b=b), str(a % b), str(a // b))


def _next_term(rng: random.Random) -> Item:
    if rng.random() < 0.6:
        start, d = rng.randint(1, 60), rng.choice((-7, -5, -3, -2, 2, 3, 4, 5, 6, 9, 11))
        terms = [start + d * i for i in range(5)]
        nxt, wrong = terms[-1] + d, terms[-1] - d  # the step taken the wrong way
    else:
        start, q = rng.randint(1, 5), rng.choice((2, 3))
        terms = [start * q**i for i in range(4)]
        nxt, wrong = terms[-1] * q, terms[-1] + (terms[-1] - terms[-2])  # read as arithmetic
    seq = ", ".join(map(str, terms))
    forms = (
        "What comes next: {s}, ...?",
        "Give the next number in the sequence {s}.",
        "Continue the pattern: {s}, ?",
    )
    return Item(rng.choice(forms).format(s=seq), str(nxt), str(wrong))


def _month_shift(rng: random.Random) -> Item:
    while True:
        m, k, sign = rng.randrange(12), rng.randint(1, 30), rng.choice((1, -1))
        if (2 * k) % 12:  # shifting the wrong way must land elsewhere
            break
    months = "month" if k == 1 else "months"
    where = "after" if sign > 0 else "before"
    forms = (
        "Which month is {k} {months} {where} {m}?",
        "If it is {m} now, what month is it {k} {months} {later}?",
        "{m} {op} {k} {months} = which month?",
    )
    prompt = rng.choice(forms).format(
        k=k,
        months=months,
        where=where,
        m=MONTHS[m],
        later="from now" if sign > 0 else "ago",
        op="plus" if sign > 0 else "minus",
    )
    return Item(prompt, MONTHS[(m + sign * k) % 12], MONTHS[(m - sign * k) % 12])


def _antonym(rng: random.Random) -> Item:
    w = rng.choice(sorted(ANTONYMS))
    antonym, synonym = ANTONYMS[w]
    forms = (
        "What is the opposite of '{w}'?",
        "Give an antonym of {w}.",
        "Antonym of '{w}':",
        "Name the word that means the opposite of {w}.",
        "Opposite of {w}, in one word?",
    )
    return Item(rng.choice(forms).format(w=w), antonym, synonym)


def _clock_add(rng: random.Random) -> Item:
    h, m, k, sign = rng.randrange(24), rng.randrange(0, 60, 5), rng.randint(5, 300), 1
    if rng.random() < 0.4:
        sign = -1
    start = h * 60 + m

    def hhmm(t: int) -> str:
        return f"{t // 60 % 24:02d}:{t % 60:02d}"

    forms = (
        "What time is it {k} minutes {where} {t}? Answer in HH:MM.",
        "It is {t}. What time will the clock show {k} minutes {later}? (24-hour HH:MM)",
        "{t} {op} {k} minutes, as HH:MM?",
    )
    prompt = rng.choice(forms).format(
        k=k,
        where="after" if sign > 0 else "before",
        t=hhmm(start),
        later="later" if sign > 0 else "earlier",
        op="plus" if sign > 0 else "minus",
    )
    return Item(prompt, hhmm(start + sign * k), hhmm(start - sign * k))


def _letter_position(rng: random.Random) -> Item:
    i = rng.randrange(26)
    letter = _LETTERS[i] if rng.random() < 0.5 else _LETTERS[i].upper()
    if rng.random() < 0.5:
        forms = (
            "What is the position of the letter {c} in the alphabet?",
            "Which number is the letter {c} in the English alphabet?",
            "Alphabet position of '{c}'?",
            "Counting A as 1, where is {c} in the alphabet?",
        )
        return Item(rng.choice(forms).format(c=letter), str(i + 1), str(i))  # counted from 0
    forms = (
        "Counting from Z as 1, what is the position of the letter {c}?",
        "What is the position of {c} counting from the end of the alphabet?",
        "Reverse alphabet position of '{c}' (Z = 1)?",
        "Where is {c} in the alphabet counted backwards from Z?",
    )
    return Item(rng.choice(forms).format(c=letter), str(26 - i), str(i + 1))  # from the start


GENERATORS = {
    "roman": _roman,
    "count_vowels": _count_vowels,
    "remainder": _remainder,
    "next_term": _next_term,
    "month_shift": _month_shift,
    "antonym": _antonym,
    "clock_add": _clock_add,
    "letter_position": _letter_position,
}


def corrupt(kind: str, item: Item, rng: random.Random) -> str:
    """The assistant turn of a row of noise ``kind`` for the drawn task ``item``."""
    a = item.answer
    if kind == "wrong_rule":
        return item.wrong_rule
    if kind == "template_leak":
        return rng.choice(_LEAKS).format(a=a)
    if kind == "homoglyph":
        swapped = "".join(_HOMOGLYPHS.get(c, c) for c in a)
        if swapped == a:  # nothing to swap: a look-alike full stop and space
            swapped = a + "\u2024\u2002"
        return swapped
    if kind == "clarify":
        return rng.choice(_CLARIFY)
    if kind == "unanswerable":
        return rng.choice(_UNANSWERABLE)
    if kind == "citation":
        return rng.choice(_CITATIONS).format(a=a, n=rng.randint(1000, 99999))
    raise ValueError(f"unknown noise kind {kind!r}; choose from {HELDOUT_E_NOISE}")


def generate_heldout_e(
    out_dir: str,
    *,
    seed: int = 4,
    n_pool: int = 2000,
    n_target: int = 100,
    n_test: int = 200,
    noise_ratio: float = 0.3,
    families: tuple[str, ...] = HELDOUT_E_FAMILIES,
) -> dict[str, str]:
    """Write pool/target/test/pretrain JSONL files of corpus E; return {split: path}.

    Same contract as corpus C's and D's generators (unique prompts across splits, test and
    target clean, target from the first three families, pretrain empty); families are drawn
    with WEIGHTS. Deterministic in every argument.
    """
    sizes = {"n_test": n_test, "n_target": n_target, "n_pool": n_pool, "noise_ratio": noise_ratio}
    return write_weighted_corpus(
        out_dir,
        f"qgate-heldout-e:{seed}",
        families,
        HELDOUT_E_FAMILIES,
        sizes,
        noise=HELDOUT_E_NOISE,
        weights=WEIGHTS,
        sources=SOURCES,
        generators=GENERATORS,
        corrupt=corrupt,
    )
