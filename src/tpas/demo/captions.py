"""Captions from an appearance and an action: template set A (training, queries), set B (held out).

Also the source ("video") captions of the training pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tpas.demo.sampling import _pick
from tpas.demo.vocabulary import (
    _BAG_NOUNS,
    _BOTTOM_NOUNS,
    _BUILD_ADJ,
    _HAT_NOUNS,
    _HELDOUT_SUBJECT_NOUNS,
    _PRONOUN,
    _SOURCE_PHRASES,
    _SUBJECT_NOUNS,
    _TOP_NOUNS,
    ACTION_PHRASES,
    HELDOUT_ACTION_PHRASES,
    HELDOUT_SCENE_PHRASES,
    SCENE_PHRASES,
    Appearance,
)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _bare(phrase: str) -> str:
    """Drop a leading article, for list-style captions ("clothing: red jacket, blue jeans")."""
    return phrase.removeprefix("a ").removeprefix("an ")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _mentions(app: Appearance, rng: np.random.Generator, must: set[str]) -> set[str]:
    """Which optional slots a caption states: a random subset, plus those a near-twin needs."""
    probs = {"bottom": 0.6, "hair": 0.35, "hat": 0.5, "bag": 0.5, "build": 0.2, "scene": 0.35}
    chosen = {k for k, p in probs.items() if rng.random() < p} | set(must)
    if app.hat == "none":
        chosen.discard("hat")
    if app.bag == "none":
        chosen.discard("bag")
    if app.build == "average":
        chosen.discard("build")
    return chosen | {"top"}


@dataclass
class _Parts:
    subject: str  # "a slim man"
    noun: str  # "man"
    pron: str
    top: str  # "a red jacket"
    bottom: str  # "blue jeans" or ""
    attrib: list[str]  # "with short black hair", "carrying a red backpack"
    predic: list[str]  # "has short black hair", "carries a red backpack"
    items: list[str]  # bare nouns for list-style templates
    action: str
    scene: str  # "" when the scene is not mentioned


def _parts(app: Appearance, action: str, scene: str, rng: np.random.Generator, must: set[str], heldout: bool) -> _Parts:
    slots = _mentions(app, rng, must)
    nouns = _HELDOUT_SUBJECT_NOUNS if heldout else _SUBJECT_NOUNS
    noun = _pick(rng, nouns[app.gender])
    adj = _pick(rng, _BUILD_ADJ[app.build]) if "build" in slots else ""
    subject = _a(f"{adj} {noun}" if adj else noun)
    top = _a(f"{app.top_colour} {_pick(rng, _TOP_NOUNS[app.top_type])}")
    bottom = ""
    if "bottom" in slots:
        bottom = f"{app.bottom_colour} {_pick(rng, _BOTTOM_NOUNS[app.bottom_type])}"
        bottom = _a(bottom) if app.bottom_type == "skirt" else bottom
    attrib, predic, items = [], [], [_bare(top)]
    if bottom:
        items.append(_bare(bottom))
    if "hair" in slots:
        hair = f"{app.hair_length} {app.hair_colour} hair" if rng.random() < 0.6 else f"{app.hair_colour} hair"
        attrib.append(f"with {hair}")
        predic.append(f"has {hair}")
        items.append(hair)
    if "hat" in slots:
        hat = _a(f"{app.hat_colour} {_pick(rng, _HAT_NOUNS[app.hat])}")
        attrib.append(f"wearing {hat}" if rng.random() < 0.5 else f"with {hat}")
        predic.append(f"wears {hat}")
        items.append(_bare(hat))
    if "bag" in slots:
        bag = _a(f"{app.bag_colour} {_pick(rng, _BAG_NOUNS[app.bag])}")
        attrib.append(f"carrying {bag}")
        predic.append(f"carries {bag}")
        items.append(_bare(bag))
    phrases = HELDOUT_ACTION_PHRASES if heldout else ACTION_PHRASES
    scenes = HELDOUT_SCENE_PHRASES if heldout else SCENE_PHRASES
    return _Parts(
        subject=subject,
        noun=noun,
        pron=_PRONOUN[app.gender],
        top=top,
        bottom=bottom,
        attrib=attrib,
        predic=predic,
        items=items,
        action=_pick(rng, phrases[action]),
        scene=_pick(rng, scenes[scene]) if "scene" in slots else "",
    )


def _outfit(p: _Parts) -> str:
    return f"{p.top} and {p.bottom}" if p.bottom else p.top


def _sp(text: str) -> str:
    """ " text" or "" so optional pieces drop out cleanly."""
    return f" {text}" if text else ""


def _tail(p: _Parts, lead: str) -> str:
    return f" {lead} {_join(p.predic)}." if p.predic else ""


# Template set A: used for training captions and the challenge queries.
_TEMPLATES_A: tuple[Callable[[_Parts], str], ...] = (
    lambda p: (
        f"{_cap(p.subject)} wearing {_outfit(p)}{', ' + _join(p.attrib) + ',' if p.attrib else ''}"
        f" is {p.action}{_sp(p.scene)}."
    ),
    lambda p: f"{_cap(p.subject)} in {_outfit(p)} {p.action}{_sp(p.scene)}.{_tail(p, _cap(p.pron))}",
    lambda p: (
        f"{_cap(p.scene)}, {p.subject} dressed in {_outfit(p)} is {p.action}.{_tail(p, _cap(p.pron))}"
        if p.scene
        else f"{_cap(p.subject)} dressed in {_outfit(p)} is {p.action}.{_tail(p, _cap(p.pron))}"
    ),
    lambda p: (
        f"This {p.noun} is {p.action}{_sp(p.scene)}. {_cap(p.pron)} is wearing {_outfit(p)}.{_tail(p, _cap(p.pron))}"
    ),
    lambda p: (
        f"{_cap(p.subject)} {p.action}{_sp(p.scene)}, wearing {_outfit(p)}{', ' + _join(p.attrib) if p.attrib else ''}."
    ),
    lambda p: f"An image of {p.subject} in {_outfit(p)} who is {p.action}{_sp(p.scene)}.{_tail(p, _cap(p.pron))}",
    lambda p: (
        f"{_cap(p.action)}{_sp(p.scene)}: {p.subject} in {_outfit(p)}{', ' + _join(p.attrib) if p.attrib else ''}."
    ),
)
# Template set B: different sentence structures; only for the held-out query captions.
_TEMPLATES_B: tuple[Callable[[_Parts], str], ...] = (
    lambda p: (
        f"Looking for {p.subject} {p.action}{_sp(p.scene)}; {p.pron} has on {_outfit(p)}."
        f"{_tail(p, _cap(p.pron) + ' also')}"
    ),
    lambda p: (
        f"{_cap(p.subject)} whose outfit is {_outfit(p)} can be seen {p.action}{_sp(p.scene)}."
        f"{_tail(p, 'The ' + p.noun)}"
    ),
    lambda p: f"Target: {p.noun}; clothing: {', '.join(p.items)}; behaviour: {p.action}{_sp(p.scene)}.",
    lambda p: f"Someone is {p.action}{_sp(p.scene)} - {p.pron} is clad in {_outfit(p)}.{_tail(p, 'This ' + p.noun)}",
    lambda p: (
        f"Visible here: {p.subject} {p.action}, clothed in {_outfit(p)}"
        f"{', ' + _join(p.attrib) if p.attrib else ''}{_sp(p.scene)}."
    ),
    lambda p: (
        f"{_cap(p.subject)} sporting {_outfit(p)}{', ' + _join(p.attrib) if p.attrib else ''},"
        f" {p.action}{_sp(p.scene)}."
    ),
    lambda p: f"The picture shows {p.subject} {p.action}{_sp(p.scene)}. Outfit: {', '.join(p.items)}.",
)


def make_caption(
    app: Appearance,
    action: str,
    scene: str,
    rng: np.random.Generator,
    must: set[str] | frozenset = frozenset(),
    heldout: bool = False,
) -> str:
    """One caption: always the action and the top's colour and type, a random subset of the rest.

    `must` lists slots ("bottom", "hair", ...) that have to be stated (near-twins differ there);
    `heldout` switches to the second template and phrase set, never used for training captions.
    """
    parts = _parts(app, action, scene, rng, set(must), heldout)
    templates = _TEMPLATES_B if heldout else _TEMPLATES_A
    return " ".join(_pick(rng, templates)(parts).split())


def _source_caption(actions: list[str], scene: str) -> str:
    return f"a person {' and then '.join(_SOURCE_PHRASES[a] for a in actions)} {SCENE_PHRASES[scene][0]}"
