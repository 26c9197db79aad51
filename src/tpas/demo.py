"""Offline demo set in PAB's exact on-disk layout, rendered procedurally.

Pedestrians are drawn with PIL (stick-figure limbs with thickness, clothing-coloured torso and
legs, a head with hair) doing one of ten actions: five normal (standing, walking, running,
playing football, waving) and five abnormal (lying, falling, being hit, fighting, crouching in
pain). Everything is deterministic per seed: the plan (people, actions, captions, names) comes
from seeded generators in the main process, and every image's own generator is seeded from
(seed, split, image index), so the bytes do not depend on the number of workers.

Layout written under the data root (see shared/pab-format/README.md):

    annotation/train/pair_<k>.json, attr_<k>.json   JSON Lines, 2,500 records a shard
    annotation/test/pair.json, attr.json             captions are lists, as in PAB
    annotation/demo_attributes.json                  one record per rendered image (demo only)
    train/imgs_<k>/{goal,wentrong}/<line>.jpg
    test/<n>.jpg
    challenge/gallery/<NAME>.jpg, query.json, query_index.txt (CRLF),
    challenge/query_gt.json, query_heldout.json      (demo-only ground truth / held-out phrasing)
    .complete                                        written last; marks a finished build
"""

from __future__ import annotations

import functools
import io
import json
import math
import multiprocessing as mp
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from tpas.errors import TpasError
from tpas.io import write_json, write_jsonl, write_text

FORMAT_VERSION = 1
SHARD_SIZE = 2500
NAME_LEN = 15
NAME_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
COMPLETE_MARKER = ".complete"
# Entries a build writes at the top of the data root; --force only ever removes these.
_OWNED_ENTRIES = {"annotation", "train", "test", "challenge", COMPLETE_MARKER}
_SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing for thin limbs
_STREAM_TRAIN, _STREAM_TEST, _STREAM_DISTRACTOR = 0, 1, 2

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 35),
    "blue": (30, 70, 215),
    "green": (30, 150, 55),
    "yellow": (245, 215, 35),
    "black": (24, 24, 26),
    "white": (242, 242, 240),
    "grey": (128, 128, 130),
    "orange": (250, 130, 20),
    "purple": (125, 45, 170),
    "pink": (250, 145, 195),
    "brown": (115, 68, 32),
}
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (22, 20, 20),
    "brown": (95, 58, 28),
    "blonde": (228, 196, 110),
    "grey": (175, 175, 172),
    "ginger": (195, 88, 30),
}
SKIN_TONES: dict[str, tuple[int, int, int]] = {
    "light": (242, 208, 182),
    "medium": (218, 172, 132),
    "tan": (182, 132, 92),
    "dark": (112, 76, 52),
}
TOP_TYPES = ("t-shirt", "jacket", "coat", "hoodie", "shirt")
BOTTOM_TYPES = ("trousers", "jeans", "shorts", "skirt")
HATS = ("none", "cap", "beanie")
BAGS = ("none", "backpack", "shoulder bag")
BUILDS = ("slim", "average", "heavy")
_BUILD_WIDTH = {"slim": 0.85, "average": 1.0, "heavy": 1.28}

NORMAL_ACTIONS = ("standing", "walking", "running", "playing_football", "waving")
ABNORMAL_ACTIONS = ("lying", "falling", "being_hit", "fighting", "crouching_in_pain")
ACTIONS = NORMAL_ACTIONS + ABNORMAL_ACTIONS
TWO_PERSON_ACTIONS = frozenset({"being_hit", "fighting"})
SCENES = ("street", "park", "indoor", "parking_lot", "plaza")

# Training / query phrasings (template set A). Each phrase works both after a noun and after "is".
ACTION_PHRASES: dict[str, tuple[str, ...]] = {
    "standing": ("standing", "standing still", "standing upright"),
    "walking": ("walking", "walking along", "strolling"),
    "running": ("running", "jogging", "running fast"),
    "playing_football": ("playing football", "kicking a football", "kicking a ball"),
    "waving": ("waving", "waving a hand", "waving hello"),
    "lying": ("lying on the ground", "lying on the pavement", "collapsed on the floor",
              "lying flat on the ground"),
    "falling": ("falling down", "falling over", "tumbling to the ground"),
    "being_hit": ("being hit by another person", "being attacked", "being punched by someone"),
    "fighting": ("fighting with another person", "fighting", "in a fight"),
    "crouching_in_pain": ("crouching in pain", "doubled over in pain", "hunched over holding the stomach"),
}
# Held-out phrasings (template set B): synonyms that share no phrase with set A, never used in training.
HELDOUT_ACTION_PHRASES: dict[str, tuple[str, ...]] = {
    "standing": ("remaining stationary", "staying in one spot", "stationary and upright"),
    "walking": ("ambling by", "out for a stroll", "moving at a leisurely pace on foot"),
    "running": ("sprinting", "dashing ahead", "moving at a sprint"),
    "playing_football": ("playing soccer", "booting a soccer ball", "striking a soccer ball with the foot"),
    "waving": ("raising one arm to greet someone", "signalling with a raised hand", "saying hi with a lifted arm"),
    "lying": ("sprawled on the ground", "stretched out motionless on the floor", "flat on the ground, not moving"),
    "falling": ("losing balance and toppling", "in the middle of a fall", "toppling backwards"),
    "being_hit": ("getting struck by an assailant", "under attack from a second person", "taking a blow from someone"),
    "fighting": ("brawling with someone", "exchanging punches with another person", "in a scuffle"),
    "crouching_in_pain": ("bent over clutching the belly", "squatting in agony", "curled up and hurting"),
}
_SOURCE_PHRASES = {
    "standing": "standing", "walking": "walking", "running": "running",
    "playing_football": "playing football", "waving": "waving", "lying": "lying on the ground",
    "falling": "falling down", "being_hit": "being hit by someone", "fighting": "fighting",
    "crouching_in_pain": "crouching in pain",
}
SCENE_PHRASES: dict[str, tuple[str, ...]] = {
    "street": ("on a city street", "on the street", "on a sidewalk"),
    "park": ("in a park", "in the park", "on the grass in a park"),
    "indoor": ("indoors", "inside a building", "in a hallway"),
    "parking_lot": ("in a parking lot", "in a car park"),
    "plaza": ("in a plaza", "in a public square", "in a town square"),
}
HELDOUT_SCENE_PHRASES: dict[str, tuple[str, ...]] = {
    "street": ("beside a road", "near the traffic lanes"),
    "park": ("among the trees of a park", "out on a lawn"),
    "indoor": ("within an indoor corridor", "inside a room"),
    "parking_lot": ("between parked cars", "in a parking area"),
    "plaza": ("on a paved square", "in an open pedestrian area"),
}
_TOP_NOUNS = {
    "t-shirt": ("t-shirt", "tee shirt", "short-sleeved top"),
    "jacket": ("jacket", "zip-up jacket"),
    "coat": ("coat", "long coat", "overcoat"),
    "hoodie": ("hoodie", "hooded top"),
    "shirt": ("shirt", "long-sleeved shirt", "button-up shirt"),
}
_BOTTOM_NOUNS = {
    "trousers": ("trousers", "pants", "slacks"),
    "jeans": ("jeans", "denim jeans"),
    "shorts": ("shorts",),
    "skirt": ("skirt", "short skirt"),
}
_HAT_NOUNS = {"cap": ("cap", "baseball cap"), "beanie": ("beanie", "knit hat")}
_BAG_NOUNS = {"backpack": ("backpack", "rucksack"), "shoulder bag": ("shoulder bag", "side bag")}
_BUILD_ADJ = {"slim": ("slim", "thin"), "average": ("",), "heavy": ("heavy-set", "stocky")}
_SUBJECT_NOUNS = {"man": ("man", "young man", "male pedestrian", "guy"),
                  "woman": ("woman", "young woman", "female pedestrian", "lady")}
_HELDOUT_SUBJECT_NOUNS = {"man": ("male person", "gentleman", "adult male"),
                          "woman": ("female person", "girl", "adult female")}
_PRONOUN = {"man": "he", "woman": "she"}

# Which caption slot must be mentioned so that a near-twin differing in this attribute is separable.
_VARIATION_MENTION = {"top_colour": "top", "top_type": "top", "bottom_colour": "bottom", "hair_colour": "hair"}


@dataclass(frozen=True)
class Appearance:
    """Everything that decides how one person looks; sampled once per identity."""

    gender: str
    build: str
    skin: str
    hair_colour: str
    hair_length: str
    top_colour: str
    top_type: str
    bottom_colour: str
    bottom_type: str
    hat: str = "none"
    hat_colour: str | None = None
    bag: str = "none"
    bag_colour: str | None = None


@dataclass(frozen=True)
class ImageSpec:
    """One image to render: who, doing what, where, and the paths (relative to the root) it goes to."""

    stream: int
    index: int
    person: str
    appearance: Appearance
    action: str
    scene: str
    partner: Appearance | None = None
    outputs: tuple[str, ...] = ()


@dataclass
class _Shot:
    """A planned image plus the bookkeeping the annotation writers need."""

    person: str
    appearance: Appearance
    action: str
    scene: str
    partner: Appearance | None
    extra: dict = field(default_factory=dict)
    must: set = field(default_factory=set)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


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
    pools = {"top_colour": tuple(COLOURS), "bottom_colour": tuple(COLOURS),
             "top_type": TOP_TYPES, "hair_colour": tuple(HAIR_COLOURS)}
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


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------


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


def _parts(app: Appearance, action: str, scene: str, rng: np.random.Generator, must: set[str],
           heldout: bool) -> _Parts:
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
    return _Parts(subject=subject, noun=noun, pron=_PRONOUN[app.gender], top=top, bottom=bottom,
                  attrib=attrib, predic=predic, items=items, action=_pick(rng, phrases[action]),
                  scene=_pick(rng, scenes[scene]) if "scene" in slots else "")


def _outfit(p: _Parts) -> str:
    return f"{p.top} and {p.bottom}" if p.bottom else p.top


def _sp(text: str) -> str:
    """" text" or "" so optional pieces drop out cleanly."""
    return f" {text}" if text else ""


def _tail(p: _Parts, lead: str) -> str:
    return f" {lead} {_join(p.predic)}." if p.predic else ""


# Template set A: used for training captions and the challenge queries.
_TEMPLATES_A: tuple[Callable[[_Parts], str], ...] = (
    lambda p: f"{_cap(p.subject)} wearing {_outfit(p)}{', ' + _join(p.attrib) + ',' if p.attrib else ''}"
              f" is {p.action}{_sp(p.scene)}.",
    lambda p: f"{_cap(p.subject)} in {_outfit(p)} {p.action}{_sp(p.scene)}.{_tail(p, _cap(p.pron))}",
    lambda p: (f"{_cap(p.scene)}, {p.subject} dressed in {_outfit(p)} is {p.action}.{_tail(p, _cap(p.pron))}"
               if p.scene else
               f"{_cap(p.subject)} dressed in {_outfit(p)} is {p.action}.{_tail(p, _cap(p.pron))}"),
    lambda p: f"This {p.noun} is {p.action}{_sp(p.scene)}. {_cap(p.pron)} is wearing {_outfit(p)}."
              f"{_tail(p, _cap(p.pron))}",
    lambda p: f"{_cap(p.subject)} {p.action}{_sp(p.scene)}, wearing {_outfit(p)}"
              f"{', ' + _join(p.attrib) if p.attrib else ''}.",
    lambda p: f"An image of {p.subject} in {_outfit(p)} who is {p.action}{_sp(p.scene)}."
              f"{_tail(p, _cap(p.pron))}",
    lambda p: f"{_cap(p.action)}{_sp(p.scene)}: {p.subject} in {_outfit(p)}"
              f"{', ' + _join(p.attrib) if p.attrib else ''}.",
)
# Template set B: different sentence structures; only for the held-out query captions.
_TEMPLATES_B: tuple[Callable[[_Parts], str], ...] = (
    lambda p: f"Looking for {p.subject} {p.action}{_sp(p.scene)}; {p.pron} has on {_outfit(p)}."
              f"{_tail(p, _cap(p.pron) + ' also')}",
    lambda p: f"{_cap(p.subject)} whose outfit is {_outfit(p)} can be seen {p.action}{_sp(p.scene)}."
              f"{_tail(p, 'The ' + p.noun)}",
    lambda p: f"Target: {p.noun}; clothing: {', '.join(p.items)}; behaviour: {p.action}{_sp(p.scene)}.",
    lambda p: f"Someone is {p.action}{_sp(p.scene)} - {p.pron} is clad in {_outfit(p)}.{_tail(p, 'This ' + p.noun)}",
    lambda p: f"Visible here: {p.subject} {p.action}, clothed in {_outfit(p)}"
              f"{', ' + _join(p.attrib) if p.attrib else ''}{_sp(p.scene)}.",
    lambda p: f"{_cap(p.subject)} sporting {_outfit(p)}{', ' + _join(p.attrib) if p.attrib else ''},"
              f" {p.action}{_sp(p.scene)}.",
    lambda p: f"The picture shows {p.subject} {p.action}{_sp(p.scene)}. Outfit: {', '.join(p.items)}.",
)


def make_caption(app: Appearance, action: str, scene: str, rng: np.random.Generator,
                 must: set[str] | frozenset = frozenset(), heldout: bool = False) -> str:
    """One caption: always the action and the top's colour and type, a random subset of the rest.

    `must` lists slots ("bottom", "hair", ...) that have to be stated (near-twins differ there);
    `heldout` switches to the second template and phrase set, never used for training captions.
    """
    parts = _parts(app, action, scene, rng, set(must), heldout)
    templates = _TEMPLATES_B if heldout else _TEMPLATES_A
    return " ".join(_pick(rng, templates)(parts).split())


def _source_caption(actions: list[str], scene: str) -> str:
    return f"a person {' and then '.join(_SOURCE_PHRASES[a] for a in actions)} {SCENE_PHRASES[scene][0]}"


# ----------------------------------------------------------------------------------------------
# Figure geometry. Body frame: y up, units of standing height, origin at the hip centre.
# Limb angles are degrees from straight down, positive towards the facing direction (+x).
# ----------------------------------------------------------------------------------------------

L_THIGH, L_SHIN, L_TORSO, L_NECK, R_HEAD = 0.245, 0.235, 0.30, 0.03, 0.068
L_UARM, L_FARM = 0.165, 0.15
W_LEG, W_ARM = 0.072, 0.05


def _d(theta: float) -> np.ndarray:
    t = math.radians(theta)
    return np.array([math.sin(t), -math.cos(t)])


def _rot(v: np.ndarray, deg: float) -> np.ndarray:
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return np.array([v[0] * c - v[1] * s, v[0] * s + v[1] * c])


def _ik(sh: np.ndarray, target: np.ndarray, bend: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-link arm reaching for `target`; `bend` (+1/-1) picks the elbow side."""
    v = target - sh
    dist = float(np.hypot(*v)) or 1e-6
    u = v / dist
    dist = min(max(dist, abs(L_UARM - L_FARM) + 1e-3), (L_UARM + L_FARM) * 0.999)
    cos_a = (L_UARM**2 + dist**2 - L_FARM**2) / (2 * L_UARM * dist)
    a = math.degrees(math.acos(max(-1.0, min(1.0, cos_a))))
    elbow = sh + L_UARM * _rot(u, bend * a)
    return elbow, sh + u * dist


@dataclass
class _Fig:
    """A posed figure: joint positions (index 0 = far/screen-left limb, 1 = near/screen-right)."""

    app: Appearance
    view: str  # "front" or "side"
    j: dict[str, np.ndarray]
    fwd: np.ndarray  # facing direction (side view); rotated with the figure

    def transform(self, fn: Callable[[np.ndarray], np.ndarray], vec_fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.j = {k: fn(v) for k, v in self.j.items()}
        self.fwd = vec_fn(self.fwd)

    def mirror(self, x0: float) -> None:
        self.transform(lambda p: np.array([2 * x0 - p[0], p[1]]), lambda v: np.array([-v[0], v[1]]))

    def rotate(self, deg: float, c: np.ndarray) -> None:
        self.transform(lambda p: c + _rot(p - c, deg), lambda v: _rot(v, deg))

    def shift(self, dx: float, dy: float = 0.0) -> None:
        self.transform(lambda p: p + np.array([dx, dy]), lambda v: v)


def _frame(tau: float, nu: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    up = np.array([math.sin(math.radians(tau)), math.cos(math.radians(tau))])
    perp = np.array([up[1], -up[0]])  # towards the front for a side view
    neck = L_TORSO * up
    head = neck + (L_NECK + R_HEAD) * np.array([math.sin(math.radians(tau + nu)), math.cos(math.radians(tau + nu))])
    return up, perp, neck, head


def _shoulder(app: Appearance, view: str, tau: float, i: int) -> np.ndarray:
    up, perp, neck, _ = _frame(tau)
    off = (0.085 * _BUILD_WIDTH[app.build]) if view == "front" else 0.012
    return neck - up * 0.03 + perp * (off if i else -off)


def _figure(app: Appearance, view: str, tau: float, arms: Sequence, legs: Sequence, nu: float = 0.0) -> _Fig:
    """Pose a figure. An arm is ("a", upper, fore) in angles or ("t", point, bend) for a reach target;
    a leg is (thigh, shin) in angles."""
    _, perp, neck, head = _frame(tau, nu)
    hip = np.zeros(2)
    hip_off = 0.045 * _BUILD_WIDTH[app.build] if view == "front" else 0.01
    j = {"hip": hip, "neck": neck, "head": head}
    for i in (0, 1):
        sh = _shoulder(app, view, tau, i)
        spec = arms[i]
        if spec[0] == "a":
            el = sh + L_UARM * _d(spec[1])
            ha = el + L_FARM * _d(spec[2])
        else:
            el, ha = _ik(sh, np.asarray(spec[1], dtype=float), spec[2])
        hp = hip + perp * (hip_off if i else -hip_off)
        kn = hp + L_THIGH * _d(legs[i][0])
        ft = kn + L_SHIN * _d(legs[i][1])
        j.update({f"sh{i}": sh, f"el{i}": el, f"ha{i}": ha, f"hp{i}": hp, f"kn{i}": kn, f"ft{i}": ft})
    return _Fig(app=app, view=view, j=j, fwd=np.array([1.0, 0.0]))


@dataclass
class _Prop:
    kind: str  # "ball", "stick", "impact"
    pts: list[np.ndarray]
    size: float


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()  # rng.random() is several times cheaper than rng.uniform()


def _compose(action: str, app: Appearance, partner: Appearance | None,
             rng: np.random.Generator) -> tuple[list[_Fig], list[_Prop], float]:
    """Pose the subject (first figure) and, for two-person actions, the other person.

    Returns figures, props and how far (body units) the group floats above the ground."""
    u = functools.partial(_u, rng)
    props: list[_Prop] = []
    lift = 0.0
    if action == "standing":
        figs = [_figure(app, "front", u(-2, 2), [("a", u(-12, -5), u(-8, 0)), ("a", u(5, 12), u(0, 8))],
                        [(u(-5, -2), u(-3, 0)), (u(2, 5), u(0, 3))])]
    elif action == "waving":
        up_arm = ("a", u(115, 145), u(160, 200))
        down_arm = ("a", u(-12, -5), u(-8, 0))
        if rng.random() < 0.5:
            arms = [down_arm, up_arm]
        else:  # mirror: the screen-left arm waves
            arms = [("a", -up_arm[1], -up_arm[2]), ("a", -down_arm[1], -down_arm[2])]
        figs = [_figure(app, "front", u(-3, 3), arms, [(u(-5, -2), u(-3, 0)), (u(2, 5), u(0, 3))])]
    elif action == "walking":
        amp = u(18, 28)
        fwd_leg, back_leg = (amp, amp * 0.2), (-amp * 0.8, -amp * 1.7)
        back_arm, fwd_arm = ("a", -amp * 0.9, -amp * 0.5), ("a", amp * 0.9, amp * 1.6)
        near_fwd = rng.random() < 0.5
        legs = [back_leg, fwd_leg] if near_fwd else [fwd_leg, back_leg]
        arms = [fwd_arm, back_arm] if near_fwd else [back_arm, fwd_arm]
        figs = [_figure(app, "side", u(0, 5), arms, legs)]
    elif action == "running":
        fwd_leg, back_leg = (u(55, 72), u(-12, 5)), (u(-38, -25), u(-105, -80))
        fwd_arm, back_arm = ("a", u(40, 60), u(125, 150)), ("a", u(-60, -40), u(20, 45))
        near_fwd = rng.random() < 0.5
        legs = [back_leg, fwd_leg] if near_fwd else [fwd_leg, back_leg]
        arms = [fwd_arm, back_arm] if near_fwd else [back_arm, fwd_arm]
        figs = [_figure(app, "side", u(12, 20), arms, legs)]
        lift = u(0.02, 0.06)
    elif action == "playing_football":
        arms = [("a", u(50, 70), u(70, 95)), ("a", u(-75, -50), u(-65, -40))]
        if rng.random() < 0.6:  # follow-through, ball leaving the foot
            fig = _figure(app, "side", u(-10, -3), arms, [(u(-8, 0), u(-6, 0)), (u(40, 58), u(62, 85))])
            ball = fig.j["ft1"] + np.array([0.09, u(-0.01, 0.04)])
        else:  # wind-up, ball on the ground in front of the standing foot
            fig = _figure(app, "side", u(0, 6), arms, [(u(0, 8), u(-2, 4)), (u(-40, -25), u(-90, -65))])
            ball = np.array([fig.j["ft0"][0] + u(0.1, 0.16), fig.j["ft0"][1] + 0.055])
        props.append(_Prop("ball", [ball], 0.058))
        figs = [fig]
    elif action == "lying":
        bent = rng.random() < 0.35
        near_leg = (u(35, 55), u(-25, -5)) if bent else (u(0, 12), u(0, 8))
        fig = _figure(app, "side", 0.0, [("a", u(-40, -15), u(-60, -20)), ("a", u(120, 170), u(140, 185))],
                      [(u(-12, 0), u(-10, 0)), near_leg])
        fig.rotate(_pick(rng, (-1, 1)) * u(84, 96), np.zeros(2))
        figs = [fig]
    elif action == "falling":
        fig = _figure(app, "side", 0.0, [("a", u(95, 130), u(60, 110)), ("a", u(135, 170), u(160, 210))],
                      [(u(-10, 8), u(-12, 5)), (u(40, 70), u(15, 50))])
        fig.rotate(_pick(rng, (-1, 1)) * u(38, 55), np.zeros(2))
        figs = [fig]
        lift = u(0.0, 0.08)
    elif action == "crouching_in_pain":
        tau = u(45, 62)
        up, perp, _, _ = _frame(tau)
        belly = up * u(0.07, 0.13) + perp * 0.07
        th, sh_ = u(70, 85), u(-32, -15)
        figs = [_figure(app, "side", tau, [("t", belly + np.array([0.0, 0.02]), 1), ("t", belly, 1)],
                        [(th - 6, sh_ - 4), (th, sh_)], nu=u(10, 28))]
    elif action == "being_hit":
        assert partner is not None
        v_tau, v_nu = u(-32, -20), u(-30, -15)
        victim = _figure(app, "side", v_tau, [("a", u(-150, -115), u(-180, -135)), ("a", u(-100, -60), u(-60, -20))],
                         [(u(-20, -8), u(-35, -20)), (u(15, 28), u(-10, 0))], nu=v_nu)
        head = victim.j["head"]
        contact = head + np.array([R_HEAD * 0.9, u(-0.01, 0.02)])
        a_tau = u(18, 28)
        sh = _shoulder(partner, "side", a_tau, 1)
        if rng.random() < 0.5:  # punch: near arm nearly straight, fist on the victim's head
            reach = (L_UARM + L_FARM) * 0.95
            dy = contact[1] - sh[1]
            dist = contact[0] + sh[0] + math.sqrt(max(reach**2 - dy**2, 0.0))
            target = np.array([dist - contact[0], contact[1]])
            attacker = _figure(partner, "side", a_tau,
                               [("t", _frame(a_tau)[3] + np.array([0.09, -0.05]), -1), ("t", target, -1)],
                               [(u(-32, -20), u(-15, -5)), (u(25, 38), u(0, 10))])
        else:  # club swung down onto the head
            hand = sh + 0.29 * _d(u(115, 140))
            stick = 0.3
            dy = contact[1] - hand[1]
            dist = contact[0] + hand[0] + math.sqrt(max(stick**2 - dy**2, 0.0))
            attacker = _figure(partner, "side", a_tau,
                               [("t", _frame(a_tau)[3] + np.array([0.09, -0.05]), -1), ("t", hand, 1)],
                               [(u(-32, -20), u(-15, -5)), (u(25, 38), u(0, 10))])
            hand_world = np.array([dist - attacker.j["ha1"][0], attacker.j["ha1"][1]])
            props.append(_Prop("stick", [hand_world, contact], 0.03))
        attacker.mirror(0.0)
        attacker.shift(dist)
        props.append(_Prop("impact", [contact + np.array([0.0, 0.02])], 0.06))
        figs = [attacker, victim]
    elif action == "fighting":
        assert partner is not None
        gap = u(0.46, 0.54)
        puncher = int(rng.integers(3))  # 0/1: that fighter throws a punch, 2: both on guard

        def fighter(a: Appearance, punch: bool) -> _Fig:
            tau = u(2, 10)
            head = _frame(tau)[3]
            if punch:  # reach for the opponent, who stands `gap` away
                near = ("t", np.array([gap, head[1] + u(-0.1, 0.0)]), -1)
            else:
                near = ("t", head + np.array([0.1, -0.06]), -1)
            return _figure(a, "side", tau, [("t", head + np.array([0.08, -0.02]), -1), near],
                           [(u(-28, -16), u(-12, -2)), (u(12, 24), u(-5, 5))])

        subject, other = fighter(app, puncher == 0), fighter(partner, puncher == 1)
        other.mirror(0.0)
        other.shift(gap)
        figs = [other, subject]
    else:
        raise ValueError(f"unknown action {action!r}")
    return figs, props, lift


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------

RGB = tuple[int, int, int]


def _shade(c: Sequence[float], f: float) -> RGB:
    return tuple(int(max(0, min(255, v * f))) for v in c)  # type: ignore[return-value]


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Convex hull (monotone chain); used for coats and skirts that span both legs."""
    pts = sorted(set(points))
    if len(pts) < 3:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


class _Painter:
    """Maps body units to pixels and draws rounded limbs, discs and polygons."""

    def __init__(self, draw: ImageDraw.ImageDraw, scale: float, ox: float, oy: float):
        self.d, self.s, self.ox, self.oy = draw, scale, ox, oy

    def px(self, p: np.ndarray) -> tuple[float, float]:
        return (self.ox + self.s * float(p[0]), self.oy - self.s * float(p[1]))

    def limb(self, pts: list[np.ndarray], width: float, colour: RGB) -> None:
        xy = [self.px(p) for p in pts]
        w = max(1.0, width * self.s)
        self.d.line(xy, fill=colour, width=round(w), joint="curve")
        for x, y in (xy[0], xy[-1]):
            r = w / 2
            self.d.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    def disc(self, c: np.ndarray, r: float, colour: RGB) -> None:
        x, y = self.px(c)
        r *= self.s
        self.d.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    def poly(self, pts: list[np.ndarray], colour: RGB) -> None:
        self.d.polygon([self.px(p) for p in pts], fill=colour)

    def slice(self, c: np.ndarray, r: float, centre_dir: np.ndarray, span: float, colour: RGB) -> None:
        """Filled circular sector around body-frame direction `centre_dir` (hair, hats)."""
        x, y = self.px(c)
        r *= self.s
        ang = math.degrees(math.atan2(-centre_dir[1], centre_dir[0]))  # PIL: clockwise from +x
        self.d.pieslice((x - r, y - r, x + r, y + r), ang - span, ang + span, fill=colour)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.hypot(*v))
    return v / n if n > 1e-9 else np.array([0.0, 1.0])


def _draw_figure(pt: _Painter, f: _Fig, rng: np.random.Generator) -> None:
    a, j = f.app, f.j
    side = f.view == "side"

    def jit(c: Sequence[float]) -> RGB:  # mild per-image lighting of each garment
        return _shade(c, _u(rng, 0.92, 1.06))

    top, bottom = jit(COLOURS[a.top_colour]), jit(COLOURS[a.bottom_colour])
    skin, hair = jit(SKIN_TONES[a.skin]), jit(HAIR_COLOURS[a.hair_colour])
    shoe = (35, 32, 30)
    bw = _BUILD_WIDTH[a.build]
    up = _unit(j["neck"] - j["hip"])
    perp = np.array([up[1], -up[0]])
    head_up = _unit(j["head"] - j["neck"])
    fwd = f.fwd
    back = -fwd if side else -head_up  # only used for side-view extras
    wl, wa = W_LEG * (0.9 + 0.2 * bw), W_ARM * (0.9 + 0.15 * bw)
    sw, hw = (0.06 * bw, 0.062 * bw) if side else (0.095 * bw, 0.078 * bw)
    shoulder_line = j["neck"] - up * 0.03

    def leg(i: int, f_: float) -> None:
        hp, kn, ft = j[f"hp{i}"], j[f"kn{i}"], j[f"ft{i}"]
        toe = ft + (fwd * 0.03 if side else np.zeros(2))
        pt.limb([ft, toe], wl * 0.8, _shade(shoe, f_))
        if a.bottom_type in ("trousers", "jeans"):
            pt.limb([hp, kn, ft], wl, _shade(bottom, f_))
        else:
            pt.limb([hp, kn, ft], wl * 0.82, _shade(skin, f_))
            if a.bottom_type == "shorts":
                pt.limb([hp, hp + (kn - hp) * 0.75], wl * 1.08, _shade(bottom, f_))

    def arm(i: int, f_: float) -> None:
        sh, el, ha = j[f"sh{i}"], j[f"el{i}"], j[f"ha{i}"]
        if a.top_type == "t-shirt":
            pt.limb([sh, el, ha], wa * 0.9, _shade(skin, f_))
            pt.limb([sh, sh + (el - sh) * 0.55], wa * 1.15, _shade(top, f_))
        else:
            pt.limb([sh, el, ha], wa, _shade(top, f_))
            pt.disc(ha, wa * 0.55, _shade(skin, f_))

    # Behind the body: backpack, hood.
    if a.bag == "backpack":
        bag = jit(COLOURS[a.bag_colour or "black"])
        c = j["hip"] + (j["neck"] - j["hip"]) * 0.58
        if side:
            c = c + back * (sw + 0.035)
            half_u, half_b = up * 0.1, back * 0.04
        else:
            half_u, half_b = up * 0.11, perp * (sw + 0.03)
        pt.poly([c + half_u + half_b, c + half_u - half_b, c - half_u - half_b, c - half_u + half_b], bag)
    if a.top_type == "hoodie":
        pt.disc(j["head"] + (back * 0.025 if side else -head_up * 0.01), R_HEAD * 1.22, _shade(top, 0.85))

    far = 0.72 if side else 1.0  # far-side limbs are darker so the two sides read apart
    if side:
        arm(0, far)
        leg(0, far)
    else:
        leg(0, 1.0)
        leg(1, 1.0)

    # Torso (coats reach down over the thighs, skirts span the hips).
    if a.top_type == "coat":
        pts = [shoulder_line + perp * sw, shoulder_line - perp * sw]
        for i in (0, 1):
            mid = j[f"hp{i}"] + (j[f"kn{i}"] - j[f"hp{i}"]) * 0.6
            pts += [tuple(mid + perp * 0.055), tuple(mid - perp * 0.055)]
        pts += [j["hip"] + perp * (hw + 0.01), j["hip"] - perp * (hw + 0.01)]
        pt.d.polygon(_hull([pt.px(np.asarray(p)) for p in pts]), fill=top)
    low = j["hip"] - up * 0.035
    pt.poly([shoulder_line - perp * sw, shoulder_line + perp * sw, low + perp * hw, low - perp * hw], top)
    pt.disc(shoulder_line - perp * (sw - wa * 0.4), wa * 0.62, top)
    pt.disc(shoulder_line + perp * (sw - wa * 0.4), wa * 0.62, top)
    if not side and a.top_type == "jacket":
        pt.limb([shoulder_line, low], 0.012, _shade(top, 0.6))
    if not side and a.top_type == "shirt":
        collar = (200, 200, 200) if a.top_colour == "white" else (235, 235, 235)
        pt.poly([shoulder_line - perp * 0.035, shoulder_line + perp * 0.035, shoulder_line - up * 0.04], collar)
    if a.bottom_type == "skirt":
        pts = []
        for i in (0, 1):
            mid = j[f"hp{i}"] + (j[f"kn{i}"] - j[f"hp{i}"]) * 0.55
            pts += [tuple(mid + perp * 0.06), tuple(mid - perp * 0.06)]
        pts += [tuple(low + perp * (hw + 0.005)), tuple(low - perp * (hw + 0.005)),
                tuple(j["hip"] + up * 0.02 + perp * hw), tuple(j["hip"] + up * 0.02 - perp * hw)]
        pt.d.polygon(_hull([pt.px(np.asarray(p)) for p in pts]), fill=bottom)
    if side:
        leg(1, 1.0)

    if a.bag == "shoulder bag":
        bag = jit(COLOURS[a.bag_colour or "black"])
        spot = j["hip"] + (fwd * 0.02 if side else perp * (hw + 0.03))
        pt.limb([j["sh1"] if not side else shoulder_line, spot + up * 0.03], 0.014, bag)
        half_u, half_p = up * 0.04, (fwd if side else perp) * 0.045
        pt.poly([spot + half_u + half_p, spot + half_u - half_p, spot - half_u - half_p, spot - half_u + half_p], bag)
    elif a.bag == "backpack" and not side:
        strap = _shade(COLOURS[a.bag_colour or "black"], 0.9)
        for s_ in (-1, 1):
            top_end = shoulder_line + perp * s_ * sw * 0.55
            pt.limb([top_end, top_end + perp * s_ * sw * 0.05 - up * 0.14], 0.016, strap)

    if side:
        arm(1, 1.0)
    else:
        arm(0, 1.0)
        arm(1, 1.0)

    # Head: long hair hangs behind it, then the face disc, then the hair cap and any hat.
    head = j["head"]
    if a.hair_length == "long":
        hang = head + (back * R_HEAD * 0.45 if side else np.zeros(2))
        pt.limb([hang, hang - head_up * (R_HEAD + 0.07)], R_HEAD * (1.4 if side else 2.1), hair)
    pt.limb([j["neck"] - up * 0.01, head], 0.035, skin)
    pt.disc(head, R_HEAD, skin)
    hair_dir = _unit(head_up + back * 0.55) if side else head_up
    pt.slice(head, R_HEAD * 1.04, hair_dir, 100 if side else 92, hair)
    if a.hat != "none":
        hat = jit(COLOURS[a.hat_colour or "black"])
        side_dir = fwd if side else np.array([head_up[1], -head_up[0]])
        if a.hat == "cap":
            pt.slice(head, R_HEAD * 1.1, head_up, 90, hat)
            if side:
                pt.limb([head + head_up * R_HEAD * 0.25, head + head_up * R_HEAD * 0.2 + fwd * R_HEAD * 1.6],
                        R_HEAD * 0.3, _shade(hat, 0.85))
            else:
                pt.limb([head + head_up * R_HEAD * 0.3 - side_dir * R_HEAD * 1.1,
                         head + head_up * R_HEAD * 0.3 + side_dir * R_HEAD * 1.1], R_HEAD * 0.28, _shade(hat, 0.85))
        else:
            pt.slice(head + head_up * R_HEAD * 0.2, R_HEAD * 1.08, head_up, 90, hat)
            pt.limb([head + head_up * R_HEAD * 0.22 - side_dir * R_HEAD * 1.05,
                     head + head_up * R_HEAD * 0.22 + side_dir * R_HEAD * 1.05], R_HEAD * 0.35, _shade(hat, 0.8))


def _draw_prop(pt: _Painter, prop: _Prop, rng: np.random.Generator) -> None:
    if prop.kind == "ball":
        c = prop.pts[0]
        pt.disc(c, prop.size * 1.1, (30, 30, 30))
        pt.disc(c, prop.size, (250, 250, 250))
        pt.disc(c + np.array([prop.size * 0.2, prop.size * 0.1]), prop.size * 0.38, (30, 30, 30))
    elif prop.kind == "stick":
        pt.limb(prop.pts, prop.size, (70, 52, 38))
    elif prop.kind == "impact":
        c = prop.pts[0]
        for k in range(7):
            v = _rot(np.array([1.0, 0.0]), k * 360 / 7 + _u(rng, -15, 15))
            pt.limb([c + v * prop.size * 0.45, c + v * prop.size * 1.1], 0.012, (255, 250, 225))


# ---- backgrounds: muted palettes so clothing colours stay the most saturated thing in view ----

def _muted(rng: np.random.Generator, base: Sequence[int], spread: int = 18) -> RGB:
    offs = rng.integers(-spread, spread + 1, size=3)
    return tuple(int(max(0, min(255, c + o))) for c, o in zip(base, offs))  # type: ignore[return-value]


def _sky(d: ImageDraw.ImageDraw, W: int, hy: float, rng: np.random.Generator) -> None:
    d.rectangle((0, 0, W, hy), fill=_muted(rng, _pick(rng, [(168, 196, 222), (196, 204, 212), (214, 214, 206)])))


def _bg_street(d, W, H, hy, rng):
    _sky(d, W, hy, rng)
    x = -rng.integers(0, 20)
    while x < W:
        w = int(rng.integers(W // 4, W // 2))
        top = hy - _u(rng, 0.15, 0.4) * H
        col = _muted(rng, _pick(rng, [(150, 130, 115), (170, 160, 145), (120, 120, 125), (160, 140, 120)]))
        d.rectangle((x, top, x + w, hy), fill=col)
        win = _shade(col, 0.7)
        for wy in np.arange(top + 6, hy - 8, 14):
            for wx in np.arange(x + 4, x + w - 8, 12):
                d.rectangle((wx, wy, wx + 6, wy + 8), fill=win)
        x += w
    road_bottom = hy + (H - hy) * _u(rng, 0.25, 0.45)
    d.rectangle((0, hy, W, road_bottom), fill=_muted(rng, (78, 78, 82), 8))
    mid = (hy + road_bottom) / 2
    for lx in range(int(rng.integers(-20, 0)), W, 36):
        d.rectangle((lx, mid - 1, lx + 18, mid + 1), fill=(225, 225, 215))
    walk = _muted(rng, (175, 172, 165), 10)
    d.rectangle((0, road_bottom, W, H), fill=walk)
    d.rectangle((0, road_bottom, W, road_bottom + 3), fill=_shade(walk, 0.75))
    for ly in np.arange(road_bottom + 14, H, 18):
        d.line((0, ly, W, ly), fill=_shade(walk, 0.88), width=1)


def _bg_park(d, W, H, hy, rng):
    _sky(d, W, hy, rng)
    for _ in range(int(rng.integers(3, 7))):
        tx, r = _u(rng, 0, W), _u(rng, 10, 24)
        d.rectangle((tx - 2, hy - r, tx + 2, hy + 2), fill=(90, 66, 45))
        d.ellipse((tx - r, hy - 2.4 * r, tx + r, hy - 0.6 * r), fill=_muted(rng, (58, 100, 52), 12))
    grass = _muted(rng, (100, 150, 78), 12)
    d.rectangle((0, hy, W, H), fill=grass)
    for _ in range(60):
        gx, gy = _u(rng, 0, W), _u(rng, hy, H)
        d.line((gx, gy, gx + _u(rng, -2, 2), gy - 4), fill=_shade(grass, 0.82), width=1)
    if rng.random() < 0.5:
        cx = _u(rng, 0.2, 0.8) * W
        path = _muted(rng, (196, 180, 150), 10)
        d.polygon([(cx - 6, hy), (cx + 6, hy), (cx + W * 0.5, H), (cx - W * 0.5, H)], fill=path)


def _bg_indoor(d, W, H, hy, rng):
    wall = _muted(rng, _pick(rng, [(222, 212, 190), (196, 206, 210), (205, 214, 196), (214, 200, 196)]), 10)
    d.rectangle((0, 0, W, hy), fill=wall)
    if rng.random() < 0.6:
        dx = _u(rng, 0, W - 30)
        d.rectangle((dx, hy - 0.32 * H, dx + 28, hy), fill=_muted(rng, (125, 95, 70)))
    if rng.random() < 0.6:
        wx = _u(rng, 0, W - 34)
        d.rectangle((wx, hy - 0.36 * H, wx + 34, hy - 0.2 * H), fill=(235, 235, 235))
        d.rectangle((wx + 3, hy - 0.36 * H + 3, wx + 31, hy - 0.2 * H - 3), fill=(178, 205, 225))
    d.rectangle((0, hy - 3, W, hy), fill=_shade(wall, 0.6))
    if rng.random() < 0.5:
        floor = _muted(rng, (150, 112, 75), 12)
        d.rectangle((0, hy, W, H), fill=floor)
        for ly in np.arange(hy + 8, H, 10):
            d.line((0, ly, W, ly), fill=_shade(floor, 0.85), width=1)
    else:
        floor = _muted(rng, (190, 190, 185), 10)
        d.rectangle((0, hy, W, H), fill=floor)
        for ly in np.arange(hy + 12, H, 16):
            d.line((0, ly, W, ly), fill=_shade(floor, 0.85), width=1)
        for lx in range(0, W, 22):
            d.line((lx, hy, lx + (lx - W / 2) * 0.8, H), fill=_shade(floor, 0.85), width=1)


def _bg_parking(d, W, H, hy, rng):
    _sky(d, W, hy, rng)
    d.rectangle((0, hy - 0.12 * H, W, hy), fill=_muted(rng, (150, 145, 140)))
    tar = _muted(rng, (82, 82, 86), 8)
    d.rectangle((0, hy, W, H), fill=tar)
    for cx in np.arange(_u(rng, -30, 0), W, 44):
        col = _muted(rng, _pick(rng, [(120, 125, 135), (150, 140, 130), (90, 95, 110), (170, 170, 165)]))
        d.rounded_rectangle((cx, hy - 16, cx + 38, hy + 8), radius=5, fill=col)
        d.rectangle((cx + 8, hy - 13, cx + 30, hy - 5), fill=(60, 70, 80))
        d.ellipse((cx + 4, hy + 3, cx + 12, hy + 11), fill=(25, 25, 25))
        d.ellipse((cx + 26, hy + 3, cx + 34, hy + 11), fill=(25, 25, 25))
    for lx in np.arange(_u(rng, -20, 0), W + 40, 34):
        d.line((lx, hy + 14, lx - 30, H), fill=(220, 220, 210), width=2)


def _bg_plaza(d, W, H, hy, rng):
    _sky(d, W, hy, rng)
    facade = _muted(rng, (200, 190, 170), 12)
    d.rectangle((0, hy - 0.3 * H, W, hy), fill=facade)
    for cx in np.arange(_u(rng, 0, 10), W, 20):
        d.rectangle((cx, hy - 0.28 * H, cx + 6, hy), fill=_shade(facade, 0.85))
    stone = _muted(rng, (185, 176, 160), 10)
    d.rectangle((0, hy, W, H), fill=stone)
    y, step = hy + 4.0, 5.0
    while y < H:
        d.line((0, y, W, y), fill=_shade(stone, 0.86), width=1)
        y, step = y + step, step * 1.25
    for lx in np.arange(-W, 2 * W, 24):
        d.line((W / 2 + (lx - W / 2) * 0.15, hy, lx, H), fill=_shade(stone, 0.86), width=1)


_BACKGROUNDS = {"street": _bg_street, "park": _bg_park, "indoor": _bg_indoor,
                "parking_lot": _bg_parking, "plaza": _bg_plaza}


def _extent(figs: list[_Fig], props: list[_Prop]) -> tuple[float, float, float, float]:
    pts = []
    for f in figs:
        pts += list(f.j.values())
        h = f.j["head"]
        pts += [h + np.array([dx, dy]) for dx, dy in ((R_HEAD, 0), (-R_HEAD, 0), (0, R_HEAD), (0, -R_HEAD))]
    for p in props:
        pts += [q + np.array(off) for q in p.pts for off in ((p.size, 0), (-p.size, 0), (0, p.size), (0, -p.size))]
    arr = np.array(pts)
    pad = 0.04  # limb half-widths and shoes
    return arr[:, 0].min() - pad, arr[:, 0].max() + pad, arr[:, 1].min() - pad, arr[:, 1].max() + pad


def render_image(spec: ImageSpec, seed: int, image_size: tuple[int, int] = (128, 64)) -> Image.Image:
    """Draw one image; its randomness comes only from (seed, spec.stream, spec.index)."""
    rng = np.random.default_rng([seed, spec.stream, spec.index])
    out_h, out_w = image_size
    H, W = out_h * _SUPERSAMPLE, out_w * _SUPERSAMPLE
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)
    hy = H * _u(rng, 0.4, 0.55)
    _BACKGROUNDS[spec.scene](d, W, H, hy, rng)

    figs, props, lift = _compose(spec.action, spec.appearance, spec.partner, rng)
    x0, x1, y0, y1 = _extent(figs, props)
    scale = H * _u(rng, 0.6, 0.8)  # pixels per body unit (a standing person is ~0.97 units)
    scale = min(scale, W * 0.94 / (x1 - x0), H * 0.9 / (y1 - y0 + lift))
    ground = H * _u(rng, 0.86, 0.96)
    ground = max(ground, H * 0.04 + (y1 - y0 + lift) * scale)
    ground = max(ground, hy + 6)
    room = W - (x1 - x0) * scale
    left = _u(rng, 0.03 * W, max(0.03 * W, room - 0.03 * W))
    ox, oy = left - x0 * scale, ground + (y0 - lift) * scale

    # Occasionally a small passer-by in the distance, so "two people" alone does not mean "abnormal".
    if rng.random() < 0.15:
        small = _compose(_pick(rng, ("standing", "walking")), sample_appearance(rng), None, rng)[0][0]
        if rng.random() < 0.5:
            small.mirror(0.0)
        s2 = scale * _u(rng, 0.25, 0.4)
        _draw_figure(_Painter(d, s2, _u(rng, 0.1, 0.9) * W, hy + _u(rng, 0.02, 0.12) * H + 0.5 * s2), small, rng)

    # Contact shadow: a darker patch of whatever ground is under the figure.
    gx = ox + scale * (x0 + x1) / 2
    shadow = _shade(img.getpixel((int(min(max(gx, 0), W - 1)), int(min(ground, H - 1)))), 0.7)
    half = (x1 - x0) * scale * 0.45
    d.ellipse((gx - half, ground - 3, gx + half, ground + 3), fill=shadow)

    pt = _Painter(d, scale, ox, oy)
    for f in figs:
        _draw_figure(pt, f, rng)
    for p in props:
        _draw_prop(pt, p, rng)

    img = img.reduce(_SUPERSAMPLE)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) * _u(rng, 0.88, 1.08)
    bank = _noise_bank(seed)
    start = int(rng.random() * (bank.size - arr.size))
    arr += bank[start:start + arr.size].reshape(arr.shape) * _u(rng, 2.0, 6.0)
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8))


@functools.lru_cache(maxsize=4)
def _noise_bank(seed: int) -> np.ndarray:
    """Gaussian noise drawn once per seed; each image reads a window at a seeded offset.

    Drawing fresh normals for every image was a third of the rendering time."""
    return np.random.default_rng([seed, 777]).standard_normal(1 << 20, dtype=np.float32)


def _encode(img: Image.Image, seed: int, spec: ImageSpec) -> bytes:
    quality = 85 + (spec.index * 7 + seed) % 10  # varied compression, still a pure function of the spec
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _render_chunk(specs: list[ImageSpec], root: str, seed: int, image_size: tuple[int, int]) -> int:
    """Worker entry point: render and write a batch of images; returns how many were done."""
    base = Path(root)
    for spec in specs:
        data = _encode(render_image(spec, seed, image_size), seed, spec)
        for rel in spec.outputs:
            # Plain writes into folders made up front: the .complete marker, not per-file renames,
            # is what tells a finished set from a half-built one, and this saves ~2 syscalls a file.
            (base / rel).write_bytes(data)
    return len(specs)


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


def _appearance_fields(app: Appearance) -> dict:
    return dict(vars(app))  # flat dataclass: much faster than asdict's deep copy


def _plan_train(seed: int, n_train: int) -> tuple[list[dict], list[ImageSpec], dict]:
    """People in "videos": one identity doing 2-4 actions (1-2 normal, 1-2 abnormal)."""
    rng = np.random.default_rng([seed, 101])
    cap_rng = np.random.default_rng([seed, 102])
    shots: list[tuple[_Shot, int, int]] = []  # (shot, video, y)
    video_captions: dict[tuple[int, int], str] = {}
    video = 0
    while len(shots) < n_train:
        app = sample_appearance(rng)
        scene = _pick(rng, SCENES)
        # 1-2 normal and 1-2 abnormal actions; P(2)=0.4 each keeps the split near 50/50.
        normals = [NORMAL_ACTIONS[i] for i in rng.permutation(len(NORMAL_ACTIONS))[: 1 + int(rng.random() < 0.4)]]
        abnormals = [ABNORMAL_ACTIONS[i] for i in rng.permutation(len(ABNORMAL_ACTIONS))[: 1 + int(rng.random() < 0.4)]]
        items = [(a, 0) for a in normals] + [(a, 1 + k) for k, a in enumerate(abnormals)]
        items = items[: n_train - len(shots)]
        person = f"p{video:06d}"
        for action, y in items:
            partner = _partner_for(app, rng) if action in TWO_PERSON_ACTIONS else None
            shots.append((_Shot(person, app, action, scene, partner), video, y))
        # One source ("video") caption per (video, y): y=0 covers the normal part of the clip.
        for y in sorted({y for _, y in items}):
            video_captions[(video, y)] = _source_caption([a for a, yy in items if yy == y], scene)
        video += 1

    captions = [make_caption(s.appearance, s.action, s.scene, cap_rng) for s, _, _ in shots]
    paths, ids = [], []
    for g, (s, _, _) in enumerate(shots):
        k, line = divmod(g, SHARD_SIZE)
        paths.append(f"train/imgs_{k}/{'goal' if s.action in NORMAL_ACTIONS else 'wentrong'}/{line}.jpg")
        ids.append(f"{k}_{line}")

    # Hard negatives: the same person in another action (preferably of the other normality), or
    # a similar-looking person (same top) doing the same action.
    by_video: dict[int, list[int]] = {}
    by_look: dict[tuple, list[int]] = {}
    by_action: dict[str, list[int]] = {}
    for g, (s, v, _) in enumerate(shots):
        by_video.setdefault(v, []).append(g)
        by_look.setdefault((s.action, s.appearance.top_colour, s.appearance.top_type), []).append(g)
        by_look.setdefault((s.action, s.appearance.top_colour), []).append(g)
        by_action.setdefault(s.action, []).append(g)
    hard_rng = np.random.default_rng([seed, 103])
    records, specs = [], []
    for g, (s, v, y) in enumerate(shots):
        same_person = [h for h in by_video[v] if shots[h][0].action != s.action]
        abnormal = s.action in ABNORMAL_ACTIONS
        flipped = [h for h in same_person if (shots[h][0].action in ABNORMAL_ACTIONS) != abnormal]
        hard = None
        if same_person and hard_rng.random() < 0.7:
            hard = _pick(hard_rng, flipped or same_person)
        else:
            look = s.appearance
            for key in ((s.action, look.top_colour, look.top_type), (s.action, look.top_colour)):
                pool = [h for h in by_look[key] if shots[h][1] != v]
                if pool:
                    hard = _pick(hard_rng, pool)
                    break
            if hard is None:
                pool = same_person or [h for h in by_action[s.action] if shots[h][1] != v] or [
                    h for h in range(len(shots)) if h != g]
                hard = _pick(hard_rng, pool) if pool else g
        records.append({
            "image": paths[g], "caption": captions[g], "image_id": ids[g],
            "hard_i": paths[hard], "hard_c": captions[hard], "hard_i_id": ids[hard],
            "source_id": f"{v}_{y}", "source_caption": video_captions[(v, y)],
            "_action": s.action, "_scene": s.scene,
        })
        specs.append(ImageSpec(_STREAM_TRAIN, g, s.person, s.appearance, s.action, s.scene, s.partner, (paths[g],)))
    n_abnormal = sum(1 for s, _, _ in shots if s.action in ABNORMAL_ACTIONS)
    stats = {"n_videos": video, "n_train_normal": len(shots) - n_abnormal, "n_train_abnormal": n_abnormal}
    attrs = [{"image": paths[g], "split": "train", "person": s.person, "video": v, "action": s.action,
              "abnormal": s.action in ABNORMAL_ACTIONS, "scene": s.scene, **_appearance_fields(s.appearance),
              "partner": None if s.partner is None else _appearance_fields(s.partner)}
             for g, (s, v, _) in enumerate(shots)]
    stats["attributes"] = attrs
    return records, specs, stats


def _plan_test(seed: int, n_test: int, n_distractors: int) -> tuple[list[_Shot], list[_Shot]]:
    """Query images (about half in near-twin groups) and distractor gallery images."""
    rng = np.random.default_rng([seed, 201])
    queries: list[_Shot] = []
    actions_of: dict[str, set[str]] = {}
    n_people = 0

    def new_person() -> str:
        nonlocal n_people
        n_people += 1
        return f"t{n_people - 1:06d}"  # "t" prefix: test people never share an id with train ("p")

    def variant(base: _Shot, kind: str) -> _Shot | None:
        if kind == "same_person":
            act = _other_action(rng, actions_of[base.person], base.action)
            if act is None:
                return None
            partner = _partner_for(base.appearance, rng) if act in TWO_PERSON_ACTIONS else None
            shot = _Shot(base.person, base.appearance, act, base.scene, partner, {"twin_kind": kind})
        else:
            attr = _pick(rng, ("top_colour", "bottom_colour", "top_type", "hair_colour"), (0.55, 0.25, 0.1, 0.1))
            app = _vary(base.appearance, attr, rng)
            scene = base.scene if rng.random() < 0.5 else _pick(rng, SCENES)
            partner = _partner_for(app, rng) if base.action in TWO_PERSON_ACTIONS else None
            shot = _Shot(new_person(), app, base.action, scene, partner, {"twin_kind": kind, "differs_in": attr})
            base.must.add(_VARIATION_MENTION[attr])
            shot.must.add(_VARIATION_MENTION[attr])
        actions_of.setdefault(shot.person, set()).add(shot.action)
        return shot

    group = 0
    while len(queries) < n_test:
        # P(single)=0.71 with groups of 2-3 puts about half of the query images in twin groups.
        size = 1 if rng.random() < 0.71 else 2 + int(rng.random() < 0.5)
        size = min(size, n_test - len(queries))
        app = sample_appearance(rng)
        action = _pick(rng, ACTIONS)
        partner = _partner_for(app, rng) if action in TWO_PERSON_ACTIONS else None
        base = _Shot(new_person(), app, action, _pick(rng, SCENES), partner,
                     {"twin_group": group, "twin_kind": "single" if size == 1 else "base"})
        actions_of[base.person] = {action}
        members = [base]
        while len(members) < size:
            twin = variant(base, _pick(rng, ("same_person", "look_alike")))
            if twin is None:
                break
            twin.extra["twin_group"] = group
            members.append(twin)
        for m in members[1:]:  # every member of a group must state what separates the group
            m.must |= base.must
        queries += members
        group += 1

    distractors: list[_Shot] = []
    for _ in range(n_distractors):
        if queries and rng.random() < 0.6:
            q = queries[int(rng.integers(len(queries)))]
            twin = variant(q, _pick(rng, ("same_person", "look_alike")))
            if twin is not None:
                twin.extra["twin_of_group"] = q.extra["twin_group"]
                twin.must = set()
                distractors.append(twin)
                continue
        app = sample_appearance(rng)
        action = _pick(rng, ACTIONS)
        partner = _partner_for(app, rng) if action in TWO_PERSON_ACTIONS else None
        shot = _Shot(new_person(), app, action, _pick(rng, SCENES), partner, {"twin_kind": "unrelated"})
        actions_of[shot.person] = {action}
        distractors.append(shot)
    return queries, distractors


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------


def demo_is_complete(out_dir: str | Path) -> bool:
    """True when a build finished: the `.complete` marker is written after everything else."""
    return (Path(out_dir) / COMPLETE_MARKER).is_file()


def _marker_params(seed: int, n_train: int, n_test: int, n_distractors: int, image_size: tuple[int, int]) -> dict:
    return {"format_version": FORMAT_VERSION, "seed": seed, "n_train": n_train, "n_test": n_test,
            "n_distractors": n_distractors, "image_size": [image_size[0], image_size[1]]}


def _prepare_out_dir(out: Path, force: bool, params: dict) -> dict | None:
    """Make `out` ready for a fresh build; returns the old marker when it already holds this exact set."""
    if out.exists() and not out.is_dir():
        raise TpasError(f"{out}: exists and is not a directory; pick another output path.")
    entries = sorted(out.iterdir()) if out.exists() else []
    if not entries:
        out.mkdir(parents=True, exist_ok=True)
        return None
    if not force:
        if demo_is_complete(out):
            try:
                marker = json.loads((out / COMPLETE_MARKER).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                marker = {}
            if all(marker.get(k) == v for k, v in params.items()):
                return marker
            raise TpasError(f"{out}: already holds a demo set built with other settings "
                            f"({COMPLETE_MARKER}: seed {marker.get('seed')}, {marker.get('n_train')} train, "
                            f"{marker.get('n_test')} test); pass --force to rebuild it or pick another directory.")
        raise TpasError(f"{out}: has files but no {COMPLETE_MARKER} marker (an interrupted or foreign build); "
                        f"pass --force to wipe and rebuild it, or pick an empty directory.")
    # Only ever delete what a build writes, so a mistyped path cannot wipe unrelated files.
    foreign = [e.name for e in entries if e.name not in _OWNED_ENTRIES and not e.name.startswith(COMPLETE_MARKER + ".")]
    if foreign:
        raise TpasError(f"{out}: refusing to wipe it: holds {', '.join(foreign[:5])} that a demo build does not "
                        f"write; empty the directory by hand or pick another one.")
    (out / COMPLETE_MARKER).unlink(missing_ok=True)  # first, so a crash mid-wipe still reads as incomplete
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        elif e.exists() or e.is_symlink():
            e.unlink()
    return None


def build_demo(out_dir: str | Path, seed: int = 0, n_train: int = 20000, n_test: int = 2000,
               distractor_ratio: float = 0.5, image_size: tuple[int, int] = (128, 64),
               workers: int = 2, progress: bool = True, force: bool = False) -> dict:
    """Render the demo set under `out_dir` and return summary counts and the wall time.

    `image_size` is (height, width). A directory that already holds a complete build with the
    same settings is left alone (the summary says `reused`); one with other files needs `force`.
    """
    t0 = time.perf_counter()
    if n_train < 2:
        raise TpasError(f"n_train must be at least 2 (got {n_train}).")
    if n_test < 1:
        raise TpasError(f"n_test must be at least 1 (got {n_test}).")
    if not 0 <= distractor_ratio <= 100:
        raise TpasError(f"distractor_ratio must be between 0 and 100 (got {distractor_ratio}).")
    if image_size[0] < 32 or image_size[1] < 16:
        raise TpasError(f"image size must be at least 32 high and 16 wide (got {image_size[0]}x{image_size[1]}).")
    if workers < 1:
        raise TpasError(f"workers must be at least 1 (got {workers}).")
    out = Path(out_dir)
    n_distractors = round(distractor_ratio * n_test)
    params = _marker_params(seed, n_train, n_test, n_distractors, image_size)
    old = _prepare_out_dir(out, force, params)
    if old is not None:
        return {**old, "out_dir": str(out), "seconds": round(time.perf_counter() - t0, 2), "reused": True}

    train_records, train_specs, train_stats = _plan_train(seed, n_train)
    queries, distractors = _plan_test(seed, n_test, n_distractors)

    # Query order in test/ is shuffled so twins are not neighbours; names are random.
    order_rng = np.random.default_rng([seed, 301])
    queries = [queries[i] for i in order_rng.permutation(len(queries))]
    cap_rng, held_rng = np.random.default_rng([seed, 302]), np.random.default_rng([seed, 303])
    captions = [make_caption(q.appearance, q.action, q.scene, cap_rng, q.must) for q in queries]
    heldout = [make_caption(q.appearance, q.action, q.scene, held_rng, q.must, heldout=True) for q in queries]
    taken: set[str] = set()
    name_rng = np.random.default_rng([seed, 304])
    gallery_q = [_random_name(name_rng, taken) for _ in queries]
    gallery_d = [_random_name(name_rng, taken) for _ in distractors]
    query_ids = [_random_name(name_rng, taken) for _ in queries]
    answer_order = [int(i) for i in order_rng.permutation(len(queries))]

    specs = list(train_specs)
    specs += [ImageSpec(_STREAM_TEST, n, q.person, q.appearance, q.action, q.scene, q.partner,
                        (f"test/{n}.jpg", f"challenge/gallery/{gallery_q[n]}.jpg")) for n, q in enumerate(queries)]
    specs += [ImageSpec(_STREAM_DISTRACTOR, k, s.person, s.appearance, s.action, s.scene, s.partner,
                        (f"challenge/gallery/{gallery_d[k]}.jpg",)) for k, s in enumerate(distractors)]
    _render_all(specs, out, seed, image_size, workers, progress)

    # Annotations, after the images so every referenced file already exists.
    for k in range(0, len(train_records), SHARD_SIZE):
        shard = train_records[k:k + SHARD_SIZE]
        pairs = [{key: v for key, v in r.items() if not key.startswith("_")} for r in shard]
        attrs = [{**p, ("normal" if r["_action"] in NORMAL_ACTIONS else "anomaly"): r["_action"], "scene": r["_scene"]}
                 for p, r in zip(pairs, shard)]
        write_jsonl(out / f"annotation/train/pair_{k // SHARD_SIZE}.json", pairs)
        write_jsonl(out / f"annotation/train/attr_{k // SHARD_SIZE}.json", attrs)
    test_pairs = [{"image": f"test/{n}.jpg", "image_id": str(n), "caption": [captions[n]]} for n in range(len(queries))]
    write_jsonl(out / "annotation/test/pair.json", test_pairs)
    write_jsonl(out / "annotation/test/attr.json", [
        {**p, ("normal" if q.action in NORMAL_ACTIONS else "anomaly"): q.action, "scene": q.scene}
        for p, q in zip(test_pairs, queries)])
    write_jsonl(out / "challenge/query.json",
                [{"query_index": query_ids[n], "caption": captions[n]} for n in answer_order])
    write_jsonl(out / "challenge/query_heldout.json",
                [{"query_index": query_ids[n], "caption": heldout[n]} for n in answer_order])
    write_jsonl(out / "challenge/query_gt.json",
                [{"query_index": query_ids[n], "image": gallery_q[n]} for n in answer_order])
    # CRLF, exactly like the real challenge file; newline="" keeps Python from translating it.
    write_text(out / "challenge/query_index.txt", "".join(query_ids[n] + "\r\n" for n in answer_order), newline="")

    attributes = train_stats.pop("attributes")
    for n, q in enumerate(queries):
        attributes.append({"image": f"test/{n}.jpg", "split": "test", "person": q.person, "action": q.action,
                           "abnormal": q.action in ABNORMAL_ACTIONS, "scene": q.scene,
                           **_appearance_fields(q.appearance),
                           "partner": None if q.partner is None else _appearance_fields(q.partner),
                           "image_id": str(n), "gallery": gallery_q[n], "query_index": query_ids[n],
                           "twin_group": q.extra["twin_group"], "twin_kind": q.extra["twin_kind"],
                           "differs_in": q.extra.get("differs_in")})
    for k, s in enumerate(distractors):
        attributes.append({"image": f"challenge/gallery/{gallery_d[k]}.jpg", "split": "distractor",
                           "person": s.person, "action": s.action, "abnormal": s.action in ABNORMAL_ACTIONS,
                           "scene": s.scene, **_appearance_fields(s.appearance),
                           "partner": None if s.partner is None else _appearance_fields(s.partner),
                           "gallery": gallery_d[k], "twin_of_group": s.extra.get("twin_of_group"),
                           "twin_kind": s.extra["twin_kind"], "differs_in": s.extra.get("differs_in")})
    write_jsonl(out / "annotation/demo_attributes.json", attributes)

    summary = {**params, **train_stats, "n_train_shards": -(-n_train // SHARD_SIZE),
               "n_gallery": len(queries) + len(distractors), "n_images": len(specs),
               "n_twin_queries": sum(1 for q in queries if q.extra["twin_kind"] != "single")}
    write_json(out / COMPLETE_MARKER, summary)  # last: its presence means the set is whole
    return {**summary, "out_dir": str(out), "seconds": round(time.perf_counter() - t0, 2), "reused": False}


def _render_all(specs: list[ImageSpec], out: Path, seed: int, image_size: tuple[int, int],
                workers: int, progress: bool) -> None:
    for folder in sorted({str(Path(rel).parent) for spec in specs for rel in spec.outputs}):
        (out / folder).mkdir(parents=True, exist_ok=True)
    chunk = 64
    chunks = [specs[i:i + chunk] for i in range(0, len(specs), chunk)]
    job = functools.partial(_render_chunk, root=str(out), seed=seed, image_size=tuple(image_size))
    with tqdm(total=len(specs), unit="img", desc="rendering", disable=not progress) as bar:
        if workers == 1 or len(chunks) == 1:
            for c in chunks:
                bar.update(job(c))
            return
        # fork where available: workers start instantly and need nothing re-imported.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            for done in pool.imap_unordered(job, chunks):
                bar.update(done)


def render_contact_sheet(path: str | Path, seed: int = 0, per_action: int = 8,
                         image_size: tuple[int, int] = (128, 64)) -> Path:
    """A PNG grid, one row per action, for eyeballing that the poses read well."""
    rng = np.random.default_rng([seed, 999])
    h, w = image_size
    label_w = 120
    sheet = Image.new("RGB", (label_w + per_action * (w + 4), len(ACTIONS) * (h + 4)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for r, action in enumerate(ACTIONS):
        d.text((4, r * (h + 4) + h // 2 - 6), action, fill=(0, 0, 0))
        for c in range(per_action):
            app = sample_appearance(rng)
            partner = _partner_for(app, rng) if action in TWO_PERSON_ACTIONS else None
            spec = ImageSpec(9, r * 1000 + c, "sheet", app, action, SCENES[c % len(SCENES)], partner)
            sheet.paste(render_image(spec, seed, image_size), (label_w + c * (w + 4), r * (h + 4)))
    path = Path(path)
    sheet.save(path)
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives byte-identical files.")
@click.option("--n-train", default=20000, show_default=True, help="Number of training image-caption pairs.")
@click.option("--n-test", default=2000, show_default=True, help="Number of test query images (one caption each).")
@click.option("--distractor-ratio", default=0.5, show_default=True,
              help="Extra gallery images without a query, as a fraction of --n-test.")
@click.option("--image-height", default=128, show_default=True, help="Height of every image in pixels.")
@click.option("--image-width", default=64, show_default=True, help="Width of every image in pixels.")
@click.option("--workers", default=2, show_default=True, help="Rendering processes (results do not depend on it).")
@click.option("--force", is_flag=True, help="Wipe an existing or half-built demo set in OUT_DIR and rebuild it.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option("--contact-sheet", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also save a PNG with example images of every action to this path.")
def main(out_dir: Path, seed: int, n_train: int, n_test: int, distractor_ratio: float, image_height: int,
         image_width: int, workers: int, force: bool, progress: bool, contact_sheet: Path | None) -> None:
    """Render the offline demo set (PAB layout plus the challenge's name-masked test set) into OUT_DIR."""
    try:
        s = build_demo(out_dir, seed=seed, n_train=n_train, n_test=n_test, distractor_ratio=distractor_ratio,
                       image_size=(image_height, image_width), workers=workers, progress=progress, force=force)
        if contact_sheet is not None:
            render_contact_sheet(contact_sheet, seed=seed, image_size=(image_height, image_width))
    except TpasError as exc:
        raise click.ClickException(str(exc)) from None
    verb = "already built" if s["reused"] else f"built in {s['seconds']:.1f} s"
    click.echo(f"demo set {verb}: {s['n_train']} train pairs ({s['n_train_normal']} normal, "
               f"{s['n_train_abnormal']} abnormal, {s['n_videos']} videos), {s['n_test']} test queries, "
               f"{s['n_distractors']} distractors, {s['n_gallery']} gallery images -> {s['out_dir']}")


if __name__ == "__main__":
    main()
