"""A second held-out corpus for bench/quality.py (corpus D): task families, sources, family
frequencies and noise kinds that no choice made on corpora A, B or C was made on.

Families (verifiable, exact-match answers of at most a few words), with their draw weights:
day_offset (3, multi-step: a weekday so many days before/after another), unit_convert (3),
prefix (3, the first n letters of a word), digit_sum (2), odd_one_out (2), plural (1, a
fixed table with irregular nouns), letter_shift (1, the letter k places before/after
another) and word_problem (1, multi-step arithmetic in a sentence). Families are drawn with
these fixed weights, not uniformly, as a real corpus is unbalanced; the first three are the
default target families.

Sources do not map 1:1 to families: ``hub/tasks_v2`` holds day_offset, letter_shift and two
thirds of unit_convert; ``web/forum`` the other third of unit_convert, odd_one_out and
word_problem; ``edu/worksheets`` prefix and plural; ``synth/numgen`` digit_sum alone.

Noise kinds, none of them made by qgate's contrast negatives, by ``qgate.synthetic`` or by
corpus C, each a kind of bad instruction data (wrong_format and mojibake stay about as short
as a clean answer, so length alone does not give every kind away):
- ``wrong_format``: the right value in a form that was not asked for (spelled out in words,
  upper case, with a unit or inside a sentence);
- ``mojibake``: the right answer with its punctuation or characters garbled as UTF-8 text
  mis-decoded as cp1252;
- ``multiple_choice``: a list of candidate answers holding the right one, and no choice made;
- ``bad_reasoning``: a short, plausible step-by-step that ends on a wrong answer;
- ``other_language``: the right answer inside a Spanish, French or German sentence;
- ``prompt_echo``: the question restated back, with no answer.

Rows carry the columns bench/quality.py reads: ``id``, ``source``, ``family``, ``noise``,
``answer`` and ``messages``.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from bench.heldout_corpus import write_weighted_corpus

HELDOUT_D_FAMILIES = (
    "day_offset",
    "unit_convert",
    "prefix",
    "digit_sum",
    "odd_one_out",
    "plural",
    "letter_shift",
    "word_problem",
)
HELDOUT_D_NOISE = (
    "wrong_format",
    "mojibake",
    "multiple_choice",
    "bad_reasoning",
    "other_language",
    "prompt_echo",
)
# family -> draw weight (the share of rows of a family is its weight over the sum of those drawn)
WEIGHTS = {
    "day_offset": 3,
    "unit_convert": 3,
    "prefix": 3,
    "digit_sum": 2,
    "odd_one_out": 2,
    "plural": 1,
    "letter_shift": 1,
    "word_problem": 1,
}
# family -> ((source, weight), ...): a row's source is drawn with these weights
SOURCES = {
    "day_offset": (("hub/tasks_v2", 1),),
    "unit_convert": (("hub/tasks_v2", 2), ("web/forum", 1)),
    "prefix": (("edu/worksheets", 1),),
    "digit_sum": (("synth/numgen", 1),),
    "odd_one_out": (("web/forum", 1),),
    "plural": (("edu/worksheets", 1),),
    "letter_shift": (("hub/tasks_v2", 1),),
    "word_problem": (("web/forum", 1),),
}

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# (from, from singular, to, factor, the factor a slip would use)
CONVERSIONS = (
    ("metres", "metre", "centimetres", 100, 10),
    ("kilometres", "kilometre", "metres", 1000, 100),
    ("kilograms", "kilogram", "grams", 1000, 100),
    ("litres", "litre", "millilitres", 1000, 100),
    ("centimetres", "centimetre", "millimetres", 10, 100),
    ("feet", "foot", "inches", 12, 10),
    ("yards", "yard", "feet", 3, 12),
    ("weeks", "week", "days", 7, 5),
    ("days", "day", "hours", 24, 12),
)
_PREFIX_TEXT = (
    "airport balcony cabinet dolphin elephant factory gallery harvest instant journal "
    "kingdom library machine network orchard package quality railway science teacher "
    "uniform village weather account balance century diamond evening fortune general "
    "history imagine justice kitchen leather monster natural obvious printer question "
    "respect station thought unknown volcano welcome anxious bedroom captain digital "
    "example fiction grocery holiday illness jewelry lecture message nothing outside "
    "pattern quarter reading shelter tonight upgrade version western battery chicken "
    "curtain dessert economy feeling glasses hundred include January license morning "
    "neither opinion perfect rainbow sausage traffic unusual vitamin website actress "
    "brother climate drawing example freedom genuine husband insight lobster mystery "
    "notebook pumpkin resort servant tractor utensil vanilla warrior blossom crystal "
    "dynamic eastern fashion gravity horizon inspire musical nervous picture pyramid "
    "sweater thunder treasure unicorn voyage whisper biscuit compass dentist emerald "
    "fountain glacier highway iceberg lantern mustard nursery orbital penguin saddle "
    "scholar tornado upstairs walrus yogurt zeppelin"
)
PREFIX_WORDS = tuple(dict.fromkeys(w.lower() for w in _PREFIX_TEXT.split()))

_PLURAL_RULES = (
    (
        lambda w: w + "s",
        "book car tree door chair bird river pencil window garden bottle candle rocket mirror "
        "ladder kitten carrot button pillow blanket ticket planet basket dragon lemon island "
        "jacket hammer tiger violin lantern spider camera guitar rabbit pocket forest teacher "
        "doctor singer farmer bridge cookie castle engine feather needle saddle table apple "
        "horse house nurse puzzle boy toy key monkey donkey valley turkey chimney tray journey "
        "holiday essay highway birthday roof chief cliff chef belief giraffe piano photo radio "
        "video kilo zoo kangaroo studio logo",
    ),
    (
        lambda w: w + "es",
        "box fox bus glass dress class kiss match watch brush dish church bench peach beach "
        "lunch wish tax switch branch witch sandwich bush coach potato tomato hero echo "
        "torpedo veto",
    ),
    (
        lambda w: w[:-1] + "ies",
        "baby city party story lady puppy cherry berry family country body penny fly spy army "
        "daisy bunny pony diary library candy hobby lily",
    ),
)
_IRREGULAR_PLURALS = {
    "leaf": "leaves",
    "knife": "knives",
    "wife": "wives",
    "wolf": "wolves",
    "half": "halves",
    "shelf": "shelves",
    "loaf": "loaves",
    "calf": "calves",
    "thief": "thieves",
    "life": "lives",
    "elf": "elves",
    "child": "children",
    "man": "men",
    "woman": "women",
    "mouse": "mice",
    "goose": "geese",
    "foot": "feet",
    "tooth": "teeth",
    "ox": "oxen",
    "person": "people",
    "sheep": "sheep",
    "deer": "deer",
    "moose": "moose",
    "series": "series",
    "species": "species",
    "aircraft": "aircraft",
    "bison": "bison",
    "crisis": "crises",
    "analysis": "analyses",
    "thesis": "theses",
    "phenomenon": "phenomena",
    "criterion": "criteria",
    "nucleus": "nuclei",
    "stimulus": "stimuli",
    "axis": "axes",
    "oasis": "oases",
}
PLURALS = {w: rule(w) for rule, text in _PLURAL_RULES for w in text.split()}
PLURALS |= _IRREGULAR_PLURALS

# category -> (phrase for "are all ...", members); no word is in two categories
CATEGORIES = {
    "fruit": ("fruits", "apple banana cherry grape mango peach pear plum lemon kiwi"),
    "animal": ("animals", "tiger horse rabbit zebra camel otter donkey wolf bear goat"),
    "colour": ("colours", "red blue green yellow purple brown black white pink grey"),
    "vehicle": ("vehicles", "car bus truck train bicycle tram scooter van taxi boat"),
    "instrument": ("musical instruments", "piano violin guitar drum flute trumpet harp cello"),
    "clothes": ("clothes", "shirt jacket scarf sock glove coat dress hat sweater skirt"),
    "furniture": ("furniture", "table chair sofa desk shelf bed stool wardrobe cabinet bench"),
}
NAMES = ("Nina", "Pablo", "Aiko", "Femi", "Lars", "Priya", "Hugo", "Mei", "Tariq", "Olga")
ITEMS = ("apples", "stickers", "marbles", "coins", "pencils", "stamps", "cards", "shells")

_ONES = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS = ("_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_MOJIBAKE = ("“{a}”", "‘{a}’", "{a} – done", "« {a} »", "→ {a}", "{a}…", "• {a}", "{a} ✓")
_OTHER_LANGUAGE = (
    "La respuesta es {a}.",
    "Claro, el resultado es {a}.",
    "La réponse est {a}.",
    "C'est {a}, bien sûr.",
    "Die Antwort ist {a}.",
    "Das Ergebnis lautet {a}.",
)
_ECHO = ("{p}", "You asked: {p}", "Question: {p}", "So the question is: {p}")
_STEP_OPENERS = ("", "Let's think step by step. ", "Step by step: ")


class Item(NamedTuple):
    """One drawn task: the prompt, its answer and the material the noise kinds are made of."""

    prompt: str
    answer: str
    wrong: tuple[str, ...]  # distinct wrong answers of the answer's kind; steps end on wrong[0]
    steps: str  # a plausible, flawed working that ends on wrong[0]
    alt: str  # the right value in a form that was not asked for


def spell_number(n: int) -> str:
    """English words for 0 <= n < 1,000,000, e.g. 4821 -> 'four thousand eight hundred
    twenty-one'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    if n < 1000:
        rest = f" {spell_number(n % 100)}" if n % 100 else ""
        return f"{_ONES[n // 100]} hundred{rest}"
    if n < 1_000_000:
        rest = f" {spell_number(n % 1000)}" if n % 1000 else ""
        return f"{spell_number(n // 1000)} thousand{rest}"
    raise ValueError(f"{n} is out of range")


def _wrongs(answer: str, first: str, others, rng: random.Random, k: int = 3) -> tuple:
    """``first`` then up to k-1 of ``others``, all distinct and none equal to ``answer``."""
    if first == answer:
        raise AssertionError(f"the flawed working ends on the right answer {answer!r}")
    pool = sorted({o for o in others if o not in (answer, first)})
    return (first, *rng.sample(pool, min(k - 1, len(pool))))


def _numbers_near(n: int, spread: tuple = (-2, -1, 1, 2, 10)) -> list[str]:
    """Numbers near ``n`` (never negative), as strings."""
    return [str(n + d) for d in spread if n + d >= 0]


def _day_offset(rng: random.Random) -> Item:
    d, k, sign = rng.randrange(7), rng.randint(1, 40), rng.choice((1, -1))
    day, days = DAYS[d], "day" if k == 1 else "days"
    if sign > 0:
        forms = (
            "What day of the week is {k} {days} after {day}?",
            "If today is {day}, what day will it be in {k} {days}?",
            "{day} plus {k} {days} is which weekday?",
        )
    else:
        forms = (
            "What day of the week is {k} {days} before {day}?",
            "If today is {day}, what day was it {k} {days} ago?",
            "{day} minus {k} {days} is which weekday?",
        )
    prompt = rng.choice(forms).format(k=k, days=days, day=day)
    answer = DAYS[(d + sign * k) % 7]
    slip = DAYS[(d + sign * (k + 1)) % 7]  # counts the start day as well
    where = "after" if sign > 0 else "before"
    steps = f"{k} mod 7 = {k % 7}, and {k % 7} days {where} {day} is {slip}."
    others = [DAYS[(d + sign * (k - 1)) % 7], DAYS[(d - sign * k) % 7], *DAYS]
    return Item(prompt, answer, _wrongs(answer, slip, others, rng), steps, answer[:3])


def _unit_convert(rng: random.Random) -> Item:
    frm, one, to, factor, slip_factor = rng.choice(CONVERSIONS)
    v = rng.randint(2, 80)
    forms = (
        "How many {to} are in {v} {frm}?",
        "Convert {v} {frm} to {to}.",
        "{v} {frm} is how many {to}?",
    )
    prompt = rng.choice(forms).format(to=to, v=v, frm=frm)
    answer = str(v * factor)
    slip = str(v * slip_factor)
    steps = f"1 {one} = {slip_factor} {to}, so {v} × {slip_factor} = {slip}."
    others = [str(v * factor + factor), str(v * factor - factor), str(v + factor)]
    return Item(prompt, answer, _wrongs(answer, slip, others, rng), steps, f"{answer} {to}")


def _prefix(rng: random.Random) -> Item:
    w = rng.choice(PREFIX_WORDS)
    n = rng.randint(2, min(5, len(w) - 1))
    forms = (
        "Write the first {n} letters of '{w}'.",
        "What are the first {n} letters of the word {w}?",
        "Give the {n}-letter prefix of '{w}'.",
    )
    prompt = rng.choice(forms).format(n=n, w=w)
    answer, slip = w[:n], w[: n + 1]
    steps = f"'{w}' starts with {slip}, so its first {n} letters are {slip}."
    others = [w[: n - 1], w[1 : n + 1], w[-n:]]
    return Item(prompt, answer, _wrongs(answer, slip, others, rng), steps, f"{answer}-")


def _digit_sum(rng: random.Random) -> Item:
    n = rng.randint(100, 99_999)
    forms = (
        "What is the sum of the digits of {n}?",
        "Add up the digits of {n}.",
        "Digit sum of {n}?",
    )
    prompt = rng.choice(forms).format(n=n)
    digits = list(str(n))
    total = sum(map(int, digits))
    answer = str(total)
    slip = str(total + rng.choice((-2, -1, 1, 2) if total >= 2 else (1, 2)))
    listed = ", ".join(digits[:-1]) + f" and {digits[-1]}"
    steps = f"The digits of {n} are {listed}; {' + '.join(digits)} = {slip}."
    others = _numbers_near(total)
    alt = f"The digit sum is {answer}."
    return Item(prompt, answer, _wrongs(answer, slip, others, rng), steps, alt)


def _odd_one_out(rng: random.Random) -> Item:
    main, odd_cat = rng.sample(sorted(CATEGORIES), 2)
    group = rng.sample(CATEGORIES[main][1].split(), 3)
    odd = rng.choice(CATEGORIES[odd_cat][1].split())
    shown = [*group, odd]
    rng.shuffle(shown)
    forms = (
        "Which word does not belong: {xs}?",
        "Find the odd one out: {xs}",
        "One of these is not like the others: {xs}. Which one?",
    )
    prompt = rng.choice(forms).format(xs=", ".join(shown))
    a, b, slip = group
    steps = f"{a}, {odd} and {b} are all {CATEGORIES[main][0]}, so the odd one out is {slip}."
    alt = f"The odd one out is {odd}."
    return Item(prompt, odd, _wrongs(odd, slip, group, rng), steps, alt)


def _plural(rng: random.Random) -> Item:
    w = rng.choice(sorted(PLURALS))
    forms = (
        "What is the plural of '{w}'?",
        "Give the plural form of the noun {w}.",
        "One {w}, two ...? Write the plural.",
    )
    prompt = rng.choice(forms).format(w=w)
    answer = PLURALS[w]
    if w + "s" != answer:
        slip, steps = w + "s", f"Most nouns just add -s, so the plural of {w} is {w}s."
    elif w.endswith("y"):
        slip = w[:-1] + "ies"
        steps = f"Nouns ending in -y change it to -ies, so the plural of {w} is {slip}."
    elif w.endswith("f") and not w.endswith("ff"):
        slip = w[:-1] + "ves"
        steps = f"Nouns ending in -f take -ves, so the plural of {w} is {slip}."
    elif w.endswith("o"):
        slip = w + "es"
        steps = f"Nouns ending in -o take -es, so the plural of {w} is {slip}."
    else:
        slip = w
        steps = f"Like sheep, {w} stays the same in the plural: {w}."
    others = [w, w + "s", w + "es", w[:-1] + "ies", w + "en"]
    return Item(prompt, answer, _wrongs(answer, slip, others, rng), steps, f"two {answer}")


def _letter_shift(rng: random.Random) -> Item:
    k, sign = rng.randint(1, 6), rng.choice((1, -1))
    i = rng.randint(0, 25 - k) if sign > 0 else rng.randint(k, 25)
    c, places, letters = (
        LETTERS[i],
        "place" if k == 1 else "places",
        "letter" if k == 1 else "letters",
    )
    if sign > 0:
        forms = (
            "Which letter is {k} {places} after '{c}' in the alphabet?",
            "What letter comes {k} {letters} after {c}?",
            "Move {k} {letters} forward from '{c}' in the alphabet. Which letter do you get?",
        )
    else:
        forms = (
            "Which letter is {k} {places} before '{c}' in the alphabet?",
            "What letter comes {k} {letters} before {c}?",
            "Move {k} {letters} back from '{c}' in the alphabet. Which letter do you get?",
        )
    prompt = rng.choice(forms).format(k=k, places=places, letters=letters, c=c)
    j = i + sign * k
    answer = LETTERS[j]
    jw = j + 1 if j < 25 else j - 1  # c's position miscounted by one
    pos, op = jw - sign * k + 1, "+" if sign > 0 else "-"
    steps = (
        f"'{c}' is letter {pos} of the alphabet; {pos} {op} {k} = {jw + 1}, "
        f"the letter {LETTERS[jw]}."
    )
    others = [LETTERS[x] for x in (j - 2, j - 1, j + 1, j + 2, i) if 0 <= x <= 25]
    return Item(
        prompt,
        answer,
        _wrongs(answer, LETTERS[jw], others, rng),
        steps,
        f"the letter {answer.upper()}",
    )


def _word_problem(rng: random.Random) -> Item:
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    how = rng.randrange(3)
    if how == 0:
        a, b = rng.randint(5, 50), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        forms = (
            "{n} has {a} {it}. {n} buys {b} more and then gives {c} away. "
            "How many {it} does {n} have now?",
            "{n} starts with {a} {it}, gets {b} more, then gives away {c}. How many {it} are left?",
        )
        total, slip = a + b - c, a + b + c
        steps = f"{a} + {b} = {a + b}, and {a + b} + {c} = {slip}."
        others = [a + b, a - c + 1, total + 1, total - 1]
    elif how == 1:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        c = rng.randint(1, a * b - 1)
        forms = (
            "{n} has {a} boxes with {b} {it} in each box and loses {c} {it}. "
            "How many {it} are left?",
            "There are {b} {it} in each of {n}'s {a} boxes. {n} loses {c}. How many {it} remain?",
        )
        total, slip = a * b - c, a * b + c
        steps = f"{a} × {b} = {a * b}, plus the {c} lost gives {slip}."
        others = [a * b, a + b - c, total + 1, total - 1]
    else:
        b, q, m = rng.randint(2, 6), rng.randint(2, 15), rng.randint(1, 4)
        a, c = b * (q + m), b * m
        forms = (
            "{n} had {a} {it}, lost {c}, and shared the rest equally among {b} friends. "
            "How many {it} did each friend get?",
            "{n} has {a} {it}. After losing {c}, {n} splits the rest evenly into {b} bags. "
            "How many {it} go in each bag?",
        )
        total, slip = q, q + m
        steps = f"{a} ÷ {b} = {slip}, so each gets {slip}."
        others = [a - c, q - 1, q + 1, a // b - 1]
    prompt = rng.choice(forms).format(n=name, a=a, b=b, c=c, it=items)
    answer = str(total)
    wrong = _wrongs(answer, str(slip), [str(o) for o in others if o >= 0], rng)
    return Item(prompt, answer, wrong, steps, f"{answer} {items}")


GENERATORS = {
    "day_offset": _day_offset,
    "unit_convert": _unit_convert,
    "prefix": _prefix,
    "digit_sum": _digit_sum,
    "odd_one_out": _odd_one_out,
    "plural": _plural,
    "letter_shift": _letter_shift,
    "word_problem": _word_problem,
}


def corrupt(kind: str, item: Item, rng: random.Random) -> str:
    """The assistant turn of a row of noise ``kind`` for the drawn task ``item``."""
    a = item.answer
    if kind == "wrong_format":
        plain = spell_number(int(a)) if a.isdigit() else a.upper()
        return rng.choice((plain, item.alt))
    if kind == "mojibake":
        if len(a) > 2 and rng.random() < 0.25:  # a character lost to U+FFFD
            i = rng.randrange(1, len(a) - 1)
            return a[:i] + "\ufffd" + a[i + 1 :]
        text = rng.choice(_MOJIBAKE).format(a=a)
        return text.encode("utf-8").decode("cp1252", errors="ignore")
    if kind == "multiple_choice":
        cands = [a, *rng.sample(item.wrong, min(len(item.wrong), rng.randint(2, 3)))]
        rng.shuffle(cands)
        how = rng.randrange(4)
        if how == 0:
            return "  ".join(f"{'ABCD'[i]}) {c}" for i, c in enumerate(cands))
        if how == 1:
            return " / ".join(cands)
        if how == 2:
            return f"It could be {', '.join(cands[:-1])} or {cands[-1]}."
        return "Possible answers: " + ", ".join(cands)
    if kind == "bad_reasoning":
        return rng.choice(_STEP_OPENERS) + item.steps
    if kind == "other_language":
        return rng.choice(_OTHER_LANGUAGE).format(a=a)
    if kind == "prompt_echo":
        return rng.choice(_ECHO).format(p=item.prompt)
    raise ValueError(f"unknown noise kind {kind!r}; choose from {HELDOUT_D_NOISE}")


def generate_heldout_d(
    out_dir: str,
    *,
    seed: int = 3,
    n_pool: int = 2000,
    n_target: int = 100,
    n_test: int = 200,
    noise_ratio: float = 0.3,
    families: tuple[str, ...] = HELDOUT_D_FAMILIES,
) -> dict[str, str]:
    """Write pool/target/test/pretrain JSONL files of corpus D; return {split: path}.

    Same contract as bench/heldout_corpus.py's ``generate_heldout`` (unique prompts across
    splits, test and target clean, target from the first three families, pretrain empty);
    families are drawn with WEIGHTS. Deterministic in every argument.
    """
    sizes = {"n_test": n_test, "n_target": n_target, "n_pool": n_pool, "noise_ratio": noise_ratio}
    return write_weighted_corpus(
        out_dir,
        f"qgate-heldout-d:{seed}",
        families,
        HELDOUT_D_FAMILIES,
        sizes,
        noise=HELDOUT_D_NOISE,
        weights=WEIGHTS,
        sources=SOURCES,
        generators=GENERATORS,
        corrupt=corrupt,
    )
