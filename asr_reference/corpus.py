"""The embedded default text: simple English sentences from a small, project-authored grammar.

Licence: the word lists below, the sentence templates in ``corpus/templates.txt`` and the file they generate (``corpus/sentences.txt``),
were written for this project and are released under the project's licence (Apache-2.0); no third-party
text is involved, so the corpus may be redistributed freely. Any other text works in its place:
``python -m asr_reference prepare --text my_book.txt`` (one sentence per line, or running text that is
split at . ! ?), e.g. a public-domain Project Gutenberg book.

Regenerate the committed file with ``python -m asr_reference.corpus`` (deterministic, seed 0).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

CORPUS_FILE = Path(__file__).with_name("corpus") / "sentences.txt"

NAMES = "anna ben carla david emma frank grace henry julia kevin laura mark nora oliver paula sam tom".split()
PEOPLE = ("the teacher", "the doctor", "the farmer", "the baker", "the driver", "my brother", "my sister",
          "our neighbour", "the old man", "the young woman", "the little girl", "the boy", "his mother",
          "her father", "the captain", "the nurse", "the student", "a stranger")
ANIMALS = "dog cat horse bird fox rabbit mouse cow sheep duck goat bear wolf fish".split()
THINGS = ("book", "letter", "box", "key", "cup", "coat", "hat", "basket", "lamp", "map", "bag", "ball",
          "chair", "table", "window", "door", "bottle", "clock", "ring", "picture", "boat", "bicycle",
          "apple", "bread", "cake", "ticket", "phone", "camera", "blanket", "candle")
PLACES = ("the market", "the river", "the station", "the garden", "the school", "the kitchen", "the park",
          "the forest", "the beach", "the village", "the library", "the hospital", "the bridge", "the farm",
          "the city", "the church", "the hill", "the harbour", "the office", "the shop")
ADJ = ("big", "small", "old", "new", "red", "blue", "green", "yellow", "heavy", "light", "warm", "cold",
       "dark", "bright", "quiet", "noisy", "clean", "dirty", "happy", "tired", "hungry", "strange", "lovely",
       "broken", "empty", "full", "wooden", "long", "short", "soft")
TIMES = ("today", "yesterday", "this morning", "last night", "every day", "on monday", "on friday",
         "in the evening", "after lunch", "before dinner", "at noon", "in the winter", "in the summer",
         "next week", "at night", "early in the morning")
NUMBERS = "two three four five six seven eight nine ten twelve twenty".split()
# (present third person, past, object kind): object kind is thing, animal, person or place
VERBS_T = [("finds", "found"), ("opens", "opened"), ("carries", "carried"), ("buys", "bought"),
           ("sells", "sold"), ("paints", "painted"), ("drops", "dropped"), ("cleans", "cleaned"),
           ("brings", "brought"), ("needs", "needed"), ("wants", "wanted"), ("likes", "liked"),
           ("takes", "took"), ("hides", "hid"), ("loses", "lost"), ("fixes", "fixed")]
VERBS_P = [("sees", "saw"), ("helps", "helped"), ("calls", "called"), ("meets", "met"),
           ("follows", "followed"), ("watches", "watched"), ("visits", "visited"), ("thanks", "thanked")]
VERBS_I = [("walks", "walked"), ("runs", "ran"), ("goes", "went"), ("drives", "drove"),
           ("swims", "swam"), ("comes back", "came back"), ("travels", "travelled")]
WEATHER = ("it is raining", "it was very cold", "the sun is shining", "the wind was strong",
           "it is snowing", "the sky was grey", "the night was quiet", "the air is warm")
FEEL = ("happy", "tired", "hungry", "afraid", "angry", "surprised", "sad", "proud", "busy", "late")


def _who(r: random.Random) -> str:
    return r.choice(NAMES) if r.random() < 0.5 else r.choice(PEOPLE)


def _thing(r: random.Random, plural_ok: bool = True) -> str:
    noun = r.choice(THINGS)
    k = r.random()
    if plural_ok and k < 0.2:
        return f"{r.choice(NUMBERS)} {noun}s" if not noun.endswith(("x", "ch")) else f"{r.choice(NUMBERS)} {noun}es"
    det = r.choice(("the", "a", "her", "his", "my", "our")) if k < 0.9 else "this"
    if det == "a" and r.random() < 0.6:
        adj = r.choice(ADJ)
        det = "an" if adj[0] in "aeiou" else "a"
        return f"{det} {adj} {noun}"
    if r.random() < 0.4:
        return f"{det} {r.choice(ADJ)} {noun}"
    return f"{det} {noun}"


def _animal(r: random.Random) -> str:
    return f"the {r.choice(ADJ)} {r.choice(ANIMALS)}" if r.random() < 0.5 else f"the {r.choice(ANIMALS)}"


TEMPLATES_FILE = Path(__file__).with_name("corpus") / "templates.txt"
_SLOT = re.compile(r"\{([^{}]+)\}")


def read_templates(path: str | Path = TEMPLATES_FILE) -> list[str]:
    """The sentence templates: one per line, ``#`` comments and blank lines skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


TEMPLATES = read_templates()


def _slots(r: random.Random, past: bool) -> dict:
    """Slot name -> a function drawing its text (in the order the template names the slots)."""
    v = 1 if past else 0
    return {
        "who": lambda: _who(r), "thing": lambda: _thing(r), "thing1": lambda: _thing(r, plural_ok=False),
        "animal": lambda: _animal(r), "animal_noun": lambda: r.choice(ANIMALS), "thing_noun": lambda: r.choice(THINGS),
        "place": lambda: r.choice(PLACES), "time": lambda: r.choice(TIMES), "weather": lambda: r.choice(WEATHER),
        "feel": lambda: r.choice(FEEL), "number": lambda: r.choice(NUMBERS),
        "verb_t": lambda: r.choice(VERBS_T)[v], "verb_p": lambda: r.choice(VERBS_P)[v],
        "verb_i": lambda: r.choice(VERBS_I)[v],
        "be": lambda: "was" if past else "is", "are": lambda: "were" if past else "are",
        "go": lambda: "went" if past else "go",
    }


def fill(template: str, r: random.Random, past: bool) -> str:
    """A template with its slots filled left to right; ``{a|b}`` picks one alternative."""
    slots = _slots(r, past)

    def one(m: re.Match) -> str:
        name = m.group(1)
        if "|" in name:
            return r.choice(tuple(name.split("|")))
        if name not in slots:
            raise ValueError(f"template {template!r}: unknown slot {{{name}}}")
        return slots[name]()

    return _SLOT.sub(one, template)


def sentence(r: random.Random, templates: list[str] | None = None) -> str:
    templates = TEMPLATES if templates is None else templates
    t = r.randrange(len(templates))
    past = r.random() < 0.5
    s = fill(templates[t], r, past)
    return s[0].upper() + s[1:] + r.choice((".", ".", ".", "!", "?"))[:1]


def generate(n: int = 5000, seed: int = 0) -> list[str]:
    """n distinct sentences (deterministic for a seed)."""
    r = random.Random(seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(sentence(r), None)
    return list(seen)


if __name__ == "__main__":
    CORPUS_FILE.parent.mkdir(exist_ok=True)
    lines = generate()
    CORPUS_FILE.write_text("# Project-authored sentences (Apache-2.0), generated by asr_reference/corpus.py, seed 0.\n"
                           + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} sentences to {CORPUS_FILE}")
