"""tpas.train.swaps: word-swap negative captions (one garment type or the gender changed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tpas.demo import vocabulary as vocab
from tpas.demo.captions import make_caption
from tpas.demo.sampling import sample_appearance
from tpas.errors import TpasError
from tpas.train import TrainConfig, swaps


def _kind_named(caption: str, groups: dict[str, tuple[str, ...]]) -> set[str]:
    found = swaps._GARMENT_PATTERNS["upper" if groups is swaps.UPPER_GARMENTS else "lower"].findall(caption)
    return {next(g for g, ps in groups.items() if m.lower() in ps) for m in found}


def test_an_upper_swap_names_another_kind_of_top_and_changes_nothing_else() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        app = sample_appearance(rng)
        caption = make_caption(app, "walking", "park", rng)
        assert "upper" in swaps.swap_kinds(caption)
        negative = swaps.swapped(caption, "upper", rng)
        before, after = _kind_named(caption, swaps.UPPER_GARMENTS), _kind_named(negative, swaps.UPPER_GARMENTS)
        assert len(before) == 1 and len(after) == 1 and before != after, (caption, negative)
        # only the garment phrase differs: the words around it are the caption's own
        m = swaps._GARMENT_PATTERNS["upper"].search(caption)
        assert negative[: m.start()] == caption[: m.start()] and negative.endswith(caption[m.end() :])


def test_a_lower_swap_and_a_gender_swap() -> None:
    rng = np.random.default_rng(1)
    caption = "This woman is fighting in a town square. She is wearing a blue zip-up jacket and green pants."
    lower = swaps.swapped(caption, "lower", rng)
    assert lower.startswith(caption[: caption.index("green ") + 6]) and not lower.endswith("green pants.")
    assert _kind_named(lower, swaps.LOWER_GARMENTS) <= {"jeans", "shorts", "skirt"}
    assert swaps.swapped(caption, "gender", rng) == (
        "This man is fighting in a town square. He is wearing a blue zip-up jacket and green pants."
    )
    # whole words only: "manner" and "others" are not gender words
    assert swaps.swapped("A Man walks in a calm manner; others watch", "gender", rng) == (
        "A Woman walks in a calm manner; others watch"
    )
    assert swaps.swap_kinds("a person walking in a plaza") == []
    assert swaps.swapped("a person walking", "upper", rng) == "a person walking"


def test_the_share_and_the_choice_follow_the_seed_and_the_pair() -> None:
    rng = np.random.default_rng(2)
    captions = [make_caption(sample_appearance(rng), "running", "street", rng) for _ in range(400)]
    frame = pd.DataFrame({"image_id": [f"0_{i}" for i in range(400)], "caption": captions, "hard_c": "x"})
    unchanged, n = swaps.with_swapped_negatives(frame, 0.0, 0)
    assert unchanged is frame and n == 0
    half, n = swaps.with_swapped_negatives(frame, 0.5, 0)
    assert 150 < n < 250 and (half["hard_c"] != "x").sum() == n
    changed = half["hard_c"] != "x"
    assert (half.loc[changed, "hard_c"] != half.loc[changed, "caption"]).all()
    assert frame["hard_c"].eq("x").all()  # the input is not modified
    # the same pair gets the same negative in any order (a resumed run re-derives its frame)
    again, _ = swaps.with_swapped_negatives(frame.iloc[::-1].reset_index(drop=True), 0.5, 0)
    assert again.set_index("image_id")["hard_c"].equals(half.set_index("image_id")["hard_c"].loc[again["image_id"]])
    other, _ = swaps.with_swapped_negatives(frame, 0.5, 1)
    assert not other["hard_c"].equals(half["hard_c"])
    every, n = swaps.with_swapped_negatives(frame, 1.0, 0)
    assert n == 400


@pytest.mark.parametrize("kw", [{"swap_negatives": 1.5}, {"swap_negatives": 0.5, "pab_hard_negatives": False}])
def test_swap_negatives_refuses_a_bad_share(kw: dict) -> None:
    with pytest.raises(TpasError, match="--swap-negatives must be a share from 0 to 1"):
        TrainConfig(**kw)


def test_the_lexicon_covers_the_demo_vocabulary() -> None:
    # the demo renders five top types and four bottom types; each must be a lexicon kind of its own
    for kind, nouns in vocab._TOP_NOUNS.items():
        assert {swaps._GROUP_OF["upper"][n] for n in nouns} == {kind}
    for kind, nouns in vocab._BOTTOM_NOUNS.items():
        assert {swaps._GROUP_OF["lower"][n] for n in nouns} == {kind}
