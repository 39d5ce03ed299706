"""A small, real SentencePiece-style vocabulary for the built-in synthetic model.

llama.cpp's SPM tokenizer starts from single UTF-8 characters, repeatedly merges the adjacent
pair whose concatenation is a vocabulary piece with the highest score, and spells anything left
over as ``<0xXX>`` byte tokens. So a vocabulary only tokenizes well if every piece can be built by
pairwise merges of other pieces. We get that by training a few hundred BPE merges on a fixed
built-in text: each merge adds one piece, scored by its rank. The result is deterministic and
needs no download, and byte fallback means arbitrary text (any language, any bytes) tokenizes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

SPACE = "\u2581"  # SentencePiece's visible space

# Token types as llama.cpp defines them (gguf.TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6

_WORDS = (
    "the of and to in is that for it as with was on be by at this are from or have an not they "
    "which one you were all we her she there would their will when who him been has more if no out "
    "so said what up its about into than them can only other new some could time these two may then "
    "do first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go "
    "came right used take three model token layer weight value quantize matrix vector tensor logits "
    "divergence baseline chunk batch context error number result type file data sample language"
).split()

_CODE = (
    "def return import from class self None True False for in if else elif while try except with "
    "print len range list dict str int float yield lambda assert raise pass break continue not and "
    "or is as = == != <= >= + - * / ( ) [ ] { } : , . # ' \" _ __init__ np array shape dtype"
).split()

_PRINTABLE = [chr(c) for c in range(33, 127)]


def _training_text(n_sentences: int = 3000) -> list[str]:
    """A fixed pseudo-text of English-like and code-like lines (a simple LCG keeps it stable)."""
    state = 12345
    lines: list[str] = []
    for i in range(n_sentences):
        words = _CODE if i % 3 == 2 else _WORDS
        length = 4 + i % 9
        picked = []
        for _ in range(length):
            state = (1103515245 * state + 12345) % (1 << 31)
            picked.append(words[(state >> 8) % len(words)])
        lines.append(" ".join(picked))
    return lines


@dataclass(frozen=True)
class SpmVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2


def build_spm_vocab(n_vocab: int = 1024) -> SpmVocab:
    """Specials, 256 byte tokens, printable characters, then BPE merges up to ``n_vocab``."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TOKEN_BYTE] * 256
    base_chars = [SPACE] + _PRINTABLE
    tokens += base_chars
    types += [TOKEN_NORMAL] * len(base_chars)
    scores = [0.0] * len(tokens)
    if n_vocab < len(tokens):
        raise ValueError(f"n_vocab must be at least {len(tokens)} (specials, bytes and characters)")

    # Words as sequences of current pieces; the SPM convention puts the space before the word.
    word_counts = Counter()
    for line in _training_text():
        for word in line.split(" "):
            word_counts[SPACE + word] += 1
    words = {w: list(w) for w in word_counts}
    known = set(tokens)
    rank = 0
    while len(tokens) < n_vocab:
        pairs: Counter = Counter()
        for word, pieces in words.items():
            count = word_counts[word]
            for a, b in zip(pieces, pieces[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        # Most frequent pair; ties broken by the text of the pair so the order is stable.
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        for word, pieces in words.items():
            i, out = 0, []
            while i < len(pieces):
                if i + 1 < len(pieces) and pieces[i] == a and pieces[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            words[word] = out
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
            types.append(TOKEN_NORMAL)
            rank += 1
            scores.append(-float(rank))
    # Pad with unused control tokens when the text ran out of merges, so n_vocab is exact.
    while len(tokens) < n_vocab:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(TOKEN_CONTROL)
        scores.append(-1e9)
    return SpmVocab(tokens=tokens, scores=scores, types=types)
