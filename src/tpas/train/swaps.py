"""Word-swap negative captions (NegCLIP, Yuksekgonul et al. 2023): a pair's caption with one garment
type or the person's gender changed, so that it no longer describes the image.

PAB's own hard negative caption (`hard_c`) describes a look-alike image and usually differs from
the caption in many words at once; a swapped caption differs in exactly one thing, the kind of
detail (a coat, not a jacket; a woman, not a man) a retrieval model misreads. `with_swapped_negatives`
replaces the hard caption of a seeded share of the training pairs with such a swap; the ITC and ITM
losses then use it where they used `hard_c`.

The lexicon is plain English clothing and gender words, grouped so that a swap always crosses
groups (a "zip-up jacket" never becomes a "jacket"); the longest phrase is matched first.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from tpas.data import stable_seed

# garment kinds: each a group of phrases that name the same kind
UPPER_GARMENTS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "tee shirt", "tee", "short-sleeved top", "short-sleeved shirt"),
    "jacket": ("jacket", "zip-up jacket", "windbreaker"),
    "coat": ("coat", "long coat", "overcoat", "trench coat"),
    "hoodie": ("hoodie", "hooded top", "hooded sweatshirt"),
    "shirt": ("shirt", "long-sleeved shirt", "button-up shirt", "blouse"),
    "sweater": ("sweater", "jumper", "pullover"),
}
LOWER_GARMENTS: dict[str, tuple[str, ...]] = {
    "trousers": ("trousers", "pants", "slacks"),
    "jeans": ("jeans", "denim jeans"),
    "shorts": ("shorts",),
    "skirt": ("skirt", "short skirt", "long skirt"),
}
# every gender word of a caption is swapped at once, so the negative stays self-consistent
GENDER_WORDS: dict[str, str] = {
    "man": "woman",
    "men": "women",
    "guy": "lady",
    "gentleman": "lady",
    "male": "female",
    "boy": "girl",
    "he": "she",
    "his": "her",
    "him": "her",
    "woman": "man",
    "women": "men",
    "lady": "man",
    "female": "male",
    "girl": "boy",
    "she": "he",
    "her": "his",
}
SWAP_KINDS = ("upper", "lower", "gender")


def _pattern(phrases: list[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])({alternatives})(?![\w-])", re.IGNORECASE)


_GARMENTS = {"upper": UPPER_GARMENTS, "lower": LOWER_GARMENTS}
_GARMENT_PATTERNS = {kind: _pattern([p for ps in groups.values() for p in ps]) for kind, groups in _GARMENTS.items()}
_GROUP_OF = {kind: {p: g for g, ps in groups.items() for p in ps} for kind, groups in _GARMENTS.items()}
_GENDER_PATTERN = _pattern(list(GENDER_WORDS))


def _match_case(word: str, like: str) -> str:
    return word[0].upper() + word[1:] if like[:1].isupper() else word


def swap_kinds(caption: str) -> list[str]:
    """Which swaps a caption allows (it names an upper garment, a lower one, a gender)."""
    kinds = [kind for kind in ("upper", "lower") if _GARMENT_PATTERNS[kind].search(caption)]
    return kinds + (["gender"] if _GENDER_PATTERN.search(caption) else [])


def swapped(caption: str, kind: str, rng: np.random.Generator) -> str:
    """`caption` with one garment of `kind` ("upper", "lower") renamed to another kind's phrase, or
    ("gender") every gender word swapped; unchanged when it has nothing of that kind."""
    if kind == "gender":
        return _GENDER_PATTERN.sub(lambda m: _match_case(GENDER_WORDS[m.group(0).lower()], m.group(0)), caption)
    matches = list(_GARMENT_PATTERNS[kind].finditer(caption))
    if not matches:
        return caption
    m = matches[int(rng.integers(len(matches)))]
    groups = _GARMENTS[kind]
    own = _GROUP_OF[kind][m.group(0).lower()]
    others = [g for g in groups if g != own]
    phrases = groups[others[int(rng.integers(len(others)))]]
    phrase = phrases[int(rng.integers(len(phrases)))]
    return caption[: m.start()] + _match_case(phrase, m.group(0)) + caption[m.end() :]


def with_swapped_negatives(frame: pd.DataFrame, share: float, seed: int) -> tuple[pd.DataFrame, int]:
    """`frame` with `hard_c` replaced by a swap of `caption` on about `share` of the rows (which rows,
    and which swap, follow from the seed and each row's image_id, so a resumed run gets the same);
    returns the frame and how many rows changed."""
    if share <= 0:
        return frame, 0
    out = frame.copy()
    changed = 0
    for row, (image_id, caption) in enumerate(zip(frame["image_id"], frame["caption"])):
        rng = np.random.default_rng(stable_seed(seed, 0x5A9, *str(image_id).encode()))
        kinds = swap_kinds(caption)
        if rng.random() >= share or not kinds:
            continue
        negative = swapped(caption, kinds[int(rng.integers(len(kinds)))], rng)
        if negative != caption:
            out.iat[row, out.columns.get_loc("hard_c")] = negative
            changed += 1
    return out, changed
