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

Modules, each importing only those above it:

    vocabulary   attribute values, actions, scenes, phrasings; `Appearance`, `ImageSpec`
    sampling     seeded draws: people, look-alikes, partners, names
    captions     caption templates (set A for training and queries, set B held out)
    poses        figure geometry and one pose composition per action
    drawing      PIL drawing, backgrounds, `render_image`, the rendering worker
    planning     the plan of the train and test splits (hard negatives, near-twins)
    build        `build_demo`: directory checks, rendering, annotations, the marker
    cli          the `python -m tpas.demo` command

Underscored names are private to the package: sibling modules share them, other code does not.
"""

from tpas.demo.build import (
    COMPLETE_MARKER,
    FORMAT_VERSION,
    build_demo,
    demo_is_complete,
    render_contact_sheet,
)
from tpas.demo.captions import make_caption
from tpas.demo.cli import main
from tpas.demo.drawing import render_image
from tpas.demo.sampling import sample_appearance
from tpas.demo.vocabulary import (
    ABNORMAL_ACTIONS,
    ACTION_PHRASES,
    ACTIONS,
    BAGS,
    BOTTOM_TYPES,
    BUILDS,
    COLOURS,
    HAIR_COLOURS,
    HATS,
    HELDOUT_ACTION_PHRASES,
    HELDOUT_SCENE_PHRASES,
    NORMAL_ACTIONS,
    SCENE_PHRASES,
    SCENES,
    SKIN_TONES,
    TOP_TYPES,
    TWO_PERSON_ACTIONS,
    Appearance,
    ImageSpec,
)

__all__ = [
    "ABNORMAL_ACTIONS",
    "ACTIONS",
    "ACTION_PHRASES",
    "BAGS",
    "BOTTOM_TYPES",
    "BUILDS",
    "COLOURS",
    "COMPLETE_MARKER",
    "FORMAT_VERSION",
    "HAIR_COLOURS",
    "HATS",
    "HELDOUT_ACTION_PHRASES",
    "HELDOUT_SCENE_PHRASES",
    "NORMAL_ACTIONS",
    "SCENES",
    "SCENE_PHRASES",
    "SKIN_TONES",
    "TOP_TYPES",
    "TWO_PERSON_ACTIONS",
    "Appearance",
    "ImageSpec",
    "build_demo",
    "demo_is_complete",
    "main",
    "make_caption",
    "render_contact_sheet",
    "render_image",
    "sample_appearance",
]
