"""How the shipped corpus in ``ggufopt_ray/data/builtin/*.txt`` was made (and can be remade).

The default sweep and the tests need text in several "languages" without a download:

- ``en`` (English prose, generated from sentence templates) and ``code`` (Python functions and
  classes, generated from code templates). The content is synthetic but well-formed, varied in
  length (a fifth of the documents are long enough to span several 256-token chunks) and
  deterministic: ``random.Random(seed)`` draws are stable across Python versions. Regenerate
  with ``python -m ggufopt_ray.data.builtin_corpus``; a test checks that the shipped files equal
  what this module generates.
- ``de`` (German prose, :data:`HANDWRITTEN`): real text, written by hand for this package
  (letters, a fable, short stories, a recipe, instructions, a report, essays; no part copied
  from another work) and dedicated to the public domain under CC0 1.0, so it ships under the
  package's MIT licence too. It is not generated: templates would make it as repetitive as the
  English, and per-language results need one language that is not. ``builtin/README.md`` says
  the same next to the files.

Documents end with the record-separator line ``"\\x1e\\n"``, the format of ../shared/models/corpus;
the file name (``{lang}.txt``) is the language label the ``builtin`` data source offers.
"""

from __future__ import annotations

import random
from pathlib import Path

RECORD_END = "\x1e\n"
N_DOCS = 60
SEED = 20240601

_NOUNS = ("model", "river", "teacher", "garden", "engine", "city", "window", "letter", "farmer",
          "bridge", "library", "storm", "village", "machine", "student", "market", "forest",
          "harbor", "kitchen", "signal", "mountain", "doctor", "painter", "road", "council", "ship",
          "tower", "weaver", "baker", "clock", "lantern", "meadow", "museum", "orchard", "pilot")
_ADJS = ("quiet", "bright", "old", "narrow", "careful", "heavy", "small", "distant", "strange",
         "patient", "cold", "busy", "gentle", "broken", "ancient", "simple", "crowded", "silver",
         "hidden", "steady", "honest", "early", "late", "wide", "curious")
_VERBS_PAST = ("crossed", "built", "watched", "repaired", "found", "carried", "measured", "opened",
               "painted", "followed", "described", "lost", "saved", "tested", "visited", "counted")
_VERBS_PRES = ("waits", "changes", "grows", "moves", "turns", "listens", "rests", "works",
               "returns", "shines", "falls", "answers")
_ADVS = ("slowly", "quickly", "rarely", "often", "quietly", "carefully", "suddenly", "always",
         "almost never", "sometimes")
_PLACES = ("the valley", "the old town", "the northern coast", "the station", "the square",
           "the hills", "the island", "the workshop", "the harbor", "the university")
_NAMES = ("Anna", "Marek", "Lucia", "Tomas", "Ingrid", "Rafael", "Sofia", "Kenji", "Amara",
          "Pieter", "Elena", "Omar", "Greta", "Jonas", "Mira", "Daniel")
_TOPICS = ("On the {adj} {noun}", "A Short History of the {noun_t}", "Notes from {place_t}",
           "Why the {noun_t} Matters", "The {adj_t} {noun_t} of {name}", "Letters about {place_t}")

_SENTENCES = (
    "The {adj} {noun} {verb_past} the {noun2} near {place}.",
    "{name} said that the {noun} was {adj}, but nobody in {place} believed it.",
    "In {year}, {name} {verb_past} {number} {noun2}s on the way to {place}.",
    "When the {noun} {verb_pres} {adv}, the {noun2} {verb_pres2} as well.",
    "Most {noun}s {adv} look {adj}; a few are {adj2} only in winter.",
    "Nobody knows why the {noun} in {place} {verb_pres} {adv}.",
    "\"{cap_adj} days are rare,\" {name} wrote, \"and the {noun} knows it.\"",
    "It took {number} years before the {noun2} was {adj} again.",
    "Every morning {name} {verb_past} the {adj} {noun} and then {verb_past2} the {noun2}.",
    "The {noun} of {place} is {adj}, {adj2} and, to most visitors, {adj3}.",
    "Some people say the {noun} {verb_pres} {adv}, while others think it never {verb_pres2} at all.",
    "By evening the {noun2}s had {verb_past} every {noun} in {place}.",
    "Was the {noun} really {adj}, or did {name} only want it to be?",
    "There were {number} {noun}s, {number2} {noun2}s and one {adj} {noun3}.",
    "After the storm, {name} {verb_past} the {noun} and found it {adj}.",
)

_FUNC_VERBS = ("load", "parse", "count", "merge", "filter", "render", "score", "split", "normalize",
               "collect", "validate", "summarize", "encode", "decode", "sort", "group")
_FUNC_NOUNS = ("records", "tokens", "lines", "items", "values", "rows", "names", "paths", "scores",
               "chunks", "events", "words", "entries", "samples", "weights", "blocks")
_VARS = ("item", "value", "row", "entry", "line", "word", "key", "name", "node", "part")
_CLASSES = ("Counter", "Buffer", "Registry", "Tracker", "Window", "Table", "Queue", "Cache",
            "Index", "Ledger", "Batch", "Report")


def _fill(template: str, rng: random.Random) -> str:
    values = {
        "adj": rng.choice(_ADJS), "adj2": rng.choice(_ADJS), "adj3": rng.choice(_ADJS),
        "noun": rng.choice(_NOUNS), "noun2": rng.choice(_NOUNS), "noun3": rng.choice(_NOUNS),
        "verb_past": rng.choice(_VERBS_PAST), "verb_past2": rng.choice(_VERBS_PAST),
        "verb_pres": rng.choice(_VERBS_PRES), "verb_pres2": rng.choice(_VERBS_PRES),
        "adv": rng.choice(_ADVS), "place": rng.choice(_PLACES), "name": rng.choice(_NAMES),
        "year": str(rng.randint(1650, 2020)), "number": str(rng.randint(2, 90)),
        "number2": str(rng.randint(2, 40)),
    }
    values["cap_adj"] = values["adj"].capitalize()
    values["noun_t"] = values["noun"].capitalize()
    values["adj_t"] = values["adj"].capitalize()
    values["place_t"] = values["place"].title()
    return template.format(**values)


def english_document(rng: random.Random) -> str:
    long_doc = rng.random() < 0.2
    n_paragraphs = rng.randint(4, 7) if long_doc else rng.randint(1, 3)
    title = _fill(rng.choice(_TOPICS), rng)
    paragraphs = [title]
    for _ in range(n_paragraphs):
        sentences = [_fill(rng.choice(_SENTENCES), rng) for _ in range(rng.randint(3, 7))]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def _code_function(rng: random.Random) -> str:
    verb, noun, var = rng.choice(_FUNC_VERBS), rng.choice(_FUNC_NOUNS), rng.choice(_VARS)
    name = f"{verb}_{noun}"
    limit = rng.randint(2, 64)
    kind = rng.randrange(5)
    if kind == 0:
        return (f"def {name}({noun}, limit={limit}):\n"
                f"    \"\"\"{verb.capitalize()} the {noun} and return at most {limit} of them.\"\"\"\n"
                f"    result = []\n"
                f"    for {var} in {noun}:\n"
                f"        if len(result) >= limit:\n"
                f"            break\n"
                f"        if {var} is not None:\n"
                f"            result.append({var})\n"
                f"    return result\n")
    if kind == 1:
        return (f"def {name}({noun}):\n"
                f"    \"\"\"Count how often each {var} occurs in {noun}.\"\"\"\n"
                f"    counts = {{}}\n"
                f"    for {var} in {noun}:\n"
                f"        counts[{var}] = counts.get({var}, 0) + 1\n"
                f"    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))\n")
    if kind == 2:
        return (f"def {name}(path, encoding=\"utf-8\"):\n"
                f"    \"\"\"Read {noun} from a file, one per line, skipping comments.\"\"\"\n"
                f"    {noun} = []\n"
                f"    try:\n"
                f"        with open(path, encoding=encoding) as fh:\n"
                f"            for line in fh:\n"
                f"                line = line.strip()\n"
                f"                if line and not line.startswith(\"#\"):\n"
                f"                    {noun}.append(line)\n"
                f"    except FileNotFoundError:\n"
                f"        return []\n"
                f"    return {noun}\n")
    if kind == 3:
        scale = rng.choice(("2.0", "0.5", "10", "1e-3", "3.14"))
        return (f"def {name}({noun}, scale={scale}):\n"
                f"    \"\"\"Scale every {var} and return the mean and the maximum.\"\"\"\n"
                f"    scaled = [{var} * scale for {var} in {noun}]\n"
                f"    if not scaled:\n"
                f"        raise ValueError(\"{name} needs at least one {var}\")\n"
                f"    return sum(scaled) / len(scaled), max(scaled)\n")
    return (f"def {name}(text, sep=\"{rng.choice([',', ';', ' ', '|'])}\"):\n"
            f"    \"\"\"Split text into {noun} and drop the empty ones.\"\"\"\n"
            f"    return [{var}.strip() for {var} in text.split(sep) if {var}.strip()]\n")


def _code_class(rng: random.Random) -> str:
    cls = rng.choice(_CLASSES)
    noun, var = rng.choice(_FUNC_NOUNS), rng.choice(_VARS)
    size = rng.randint(4, 256)
    return (f"class {cls}:\n"
            f"    \"\"\"Keep the last {size} {noun} and answer simple questions about them.\"\"\"\n"
            f"\n"
            f"    def __init__(self, size={size}):\n"
            f"        self.size = size\n"
            f"        self.{noun} = []\n"
            f"\n"
            f"    def add(self, {var}):\n"
            f"        self.{noun}.append({var})\n"
            f"        if len(self.{noun}) > self.size:\n"
            f"            self.{noun}.pop(0)\n"
            f"\n"
            f"    def __len__(self):\n"
            f"        return len(self.{noun})\n"
            f"\n"
            f"    def latest(self, n=1):\n"
            f"        return self.{noun}[-n:]\n")


def code_document(rng: random.Random) -> str:
    long_doc = rng.random() < 0.2
    n_parts = rng.randint(4, 7) if long_doc else rng.randint(1, 2)
    imports = sorted(rng.sample(["import os", "import re", "import json", "import math",
                                 "from pathlib import Path", "from collections import Counter"],
                                rng.randint(0, 3)))
    parts = ["\n".join(imports) + "\n"] if imports else []
    for _ in range(n_parts):
        parts.append(_code_class(rng) if rng.random() < 0.25 else _code_function(rng))
    return "\n\n".join(parts)


GENERATORS = {"en": english_document, "code": code_document}
#: shipped languages written by hand (not generated); see the module docstring for the licence
HANDWRITTEN = ("de",)


def generate(lang: str, n_docs: int = N_DOCS, seed: int = SEED) -> str:
    """The text of ``builtin/{lang}.txt``: ``n_docs`` documents, each ending with ``"\\x1e\\n"``."""
    rng = random.Random(f"{seed}-{lang}")
    return "".join(GENERATORS[lang](rng).rstrip("\n") + "\n" + RECORD_END for _ in range(n_docs))


def write_builtin_corpus(directory: str | Path = Path(__file__).parent / "builtin") -> list[Path]:
    """(Re)write the generated files; the hand-written ones (:data:`HANDWRITTEN`) are left alone."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for lang in GENERATORS:
        path = directory / f"{lang}.txt"
        path.write_text(generate(lang), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_builtin_corpus():
        print(p, p.stat().st_size)
