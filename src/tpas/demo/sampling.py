"""Random draws over the vocabulary: people, look-alikes, partners, other actions, file names.

Every draw goes through `_pick` (one `rng.random()` call), so a plan is a pure function of its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from tpas.demo.vocabulary import (
    ABNORMAL_ACTIONS,
    BAGS,
    BOTTOM_TYPES,
    BUILDS,
    COLOURS,
    HAIR_COLOURS,
    HATS,
    NORMAL_ACTIONS,
    SKIN_TONES,
    TOP_TYPES,
    Appearance,
)

NAME_LEN = 15
NAME_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _pick(rng: np.random.Generator, seq: Sequence, p: Sequence[float] | None = None):
    """One item of `seq` (optionally weighted by `p`); one rng.random() call, the cheapest draw."""
    r = rng.random()
    if p is None:
        return seq[min(int(r * len(seq)), len(seq) - 1)]
    r *= sum(p)
    for item, w in zip(seq, p):
        r -= w
        if r < 0:
            return item
    return seq[-1]


def sample_appearance(rng: np.random.Generator) -> Appearance:
    """Draw a random person from the shared attribute vocabulary."""
    colours = tuple(COLOURS)
    gender = _pick(rng, ("man", "woman"))
    woman = gender == "woman"
    bottom_type = _pick(rng, BOTTOM_TYPES, (0.3, 0.3, 0.15, 0.25) if woman else (0.4, 0.4, 0.2, 0.0))
    # Jeans are usually blue, as in real captions; every other garment takes any colour.
    bottom_colour = "blue" if bottom_type == "jeans" and rng.random() < 0.5 else _pick(rng, colours)
    hat = _pick(rng, HATS, (0.6, 0.22, 0.18))
    bag = _pick(rng, BAGS, (0.5, 0.3, 0.2))
    return Appearance(
        gender=gender,
        build=_pick(rng, BUILDS, (0.3, 0.5, 0.2)),
        skin=_pick(rng, tuple(SKIN_TONES)),
        hair_colour=_pick(rng, tuple(HAIR_COLOURS), (0.35, 0.3, 0.18, 0.09, 0.08)),
        hair_length="long" if rng.random() < (0.75 if woman else 0.12) else "short",
        top_colour=_pick(rng, colours),
        top_type=_pick(rng, TOP_TYPES),
        bottom_colour=bottom_colour,
        bottom_type=bottom_type,
        hat=hat,
        hat_colour=None if hat == "none" else _pick(rng, colours),
        bag=bag,
        bag_colour=None if bag == "none" else _pick(rng, colours),
    )


def _vary(app: Appearance, attr: str, rng: np.random.Generator) -> Appearance:
    """A look-alike: the same outfit with exactly one attribute changed."""
    pools = {
        "top_colour": tuple(COLOURS),
        "bottom_colour": tuple(COLOURS),
        "top_type": TOP_TYPES,
        "hair_colour": tuple(HAIR_COLOURS),
    }
    choices = [v for v in pools[attr] if v != getattr(app, attr)]
    return replace(app, **{attr: _pick(rng, choices)})


def _partner_for(app: Appearance, rng: np.random.Generator) -> Appearance:
    """The second person in a two-person action, dressed clearly differently from the subject."""
    other = sample_appearance(rng)
    colours = tuple(COLOURS)
    if other.top_colour == app.top_colour:
        other = replace(other, top_colour=_pick(rng, [c for c in colours if c != app.top_colour]))
    if other.bottom_colour == app.bottom_colour:
        other = replace(other, bottom_colour=_pick(rng, [c for c in colours if c != app.bottom_colour]))
    return other


def _other_action(rng: np.random.Generator, used: set[str], base: str) -> str | None:
    """An action this person has not been shown doing, usually of the opposite normality."""
    opposite = ABNORMAL_ACTIONS if base in NORMAL_ACTIONS else NORMAL_ACTIONS
    same = NORMAL_ACTIONS if base in NORMAL_ACTIONS else ABNORMAL_ACTIONS
    first, second = (opposite, same) if rng.random() < 0.65 else (same, opposite)
    for pool in (first, second):
        free = [a for a in pool if a not in used]
        if free:
            return _pick(rng, free)
    return None


def _random_name(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        name = "".join(NAME_ALPHABET[i] for i in rng.integers(len(NAME_ALPHABET), size=NAME_LEN))
        if name not in taken:
            taken.add(name)
            return name
