"""The demo set's vocabulary: attribute values, colours, actions, scenes and every phrasing of them.

Also the two records the other modules pass around: `Appearance` (one person's look) and
`ImageSpec` (one image to render). Imports nothing from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    "lying": ("lying on the ground", "lying on the pavement", "collapsed on the floor", "lying flat on the ground"),
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
    "standing": "standing",
    "walking": "walking",
    "running": "running",
    "playing_football": "playing football",
    "waving": "waving",
    "lying": "lying on the ground",
    "falling": "falling down",
    "being_hit": "being hit by someone",
    "fighting": "fighting",
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
_SUBJECT_NOUNS = {
    "man": ("man", "young man", "male pedestrian", "guy"),
    "woman": ("woman", "young woman", "female pedestrian", "lady"),
}
_HELDOUT_SUBJECT_NOUNS = {
    "man": ("male person", "gentleman", "adult male"),
    "woman": ("female person", "girl", "adult female"),
}
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
