"""tpas.experiments.attributes: what a demo caption states, the attribute ceiling, a run's errors."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tpas.demo import vocabulary as vocab
from tpas.demo.captions import make_caption
from tpas.demo.drawing import render_image
from tpas.demo.sampling import sample_appearance
from tpas.demo.vocabulary import ImageSpec
from tpas.errors import TpasError
from tpas.experiments import attributes as attr_lib

EVERY_SLOT = {"bottom", "hair", "hat", "bag", "build", "scene"}


def _shown(app, action: str = "walking", scene: str = "park") -> dict:
    return {**asdict(app), "action": action, "scene": scene}


@pytest.mark.parametrize("heldout", [False, True], ids=["template-a", "held-out"])
def test_every_slot_the_generator_states_is_found(heldout: bool) -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        app = sample_appearance(rng)
        caption = make_caption(app, "walking", "park", rng, must=EVERY_SLOT, heldout=heldout)
        expected = {"action", "gender", "top_colour", "top_type", "bottom_colour", "bottom_type", "hair_colour"}
        expected |= {"hat"} if app.hat != "none" else set()
        expected |= {"bag"} if app.bag != "none" else set()
        # build and hair length are optional even here (some templates drop the subject's adjective,
        # 40% of hair mentions drop the length): test_only_what_the_caption_says_counts_as_stated
        said = set(attr_lib.stated(caption, _shown(app))) - {"build", "hair_length"}
        assert said == expected | {"scene"}, caption


def test_only_what_the_caption_says_counts_as_stated() -> None:
    app = sample_appearance(np.random.default_rng(3))
    shown = {
        **_shown(app),
        "top_colour": "black",
        "top_type": "jacket",
        "bottom_colour": "blue",
        "bottom_type": "jeans",
        "hair_colour": "black",
        "hat": "cap",
        "hat_colour": "red",
        "bag": "none",
    }
    said = attr_lib.stated("A man in a black zip-up jacket and blue jeans is strolling.", shown)
    # "black" names the jacket, not the hair; no hat is mentioned; no scene phrase
    assert said == ["action", "gender", "top_colour", "top_type", "bottom_colour", "bottom_type"]
    assert "bottom_colour" not in attr_lib.stated("A man in a black jacket, blue sky behind him.", shown)
    slim = {**shown, "build": "slim", "hair_length": "long"}
    said = attr_lib.stated("A thin man in a black jacket with long black hair is walking.", slim)
    assert {"build", "hair_length", "hair_colour"} <= set(said)
    assert not {"build", "hair_length"} & set(attr_lib.stated("A man in a black jacket has black hair.", slim))


def _cfg(root: Path, **kw) -> attr_lib.AttributesConfig:
    return attr_lib.AttributesConfig(data_root=root, **kw)


def test_ceiling_falls_as_attributes_become_unreadable(tiny_demo: Path) -> None:
    queries, gallery, _ = attr_lib._load(_cfg(tiny_demo))
    full = attr_lib.ceiling(queries, gallery, set())
    blind = attr_lib.ceiling(queries, gallery, {"top_type", "gender", "top_colour"})
    assert full["queries"] == len(queries) == 24
    assert 0 < blind["expected_R@1"] < full["expected_R@1"] <= 100
    assert blind["unique_queries"] < full["unique_queries"]
    # reading nothing but the action leaves each query a pick among every image of that action
    action_only = attr_lib.ceiling(queries, gallery, set(attr_lib.SLOTS) - {"action"})
    same_action = [sum(g["action"] == gallery[i]["action"] for g in gallery.values()) for i in queries["image"]]
    assert action_only["expected_R@1"] == pytest.approx(100 * np.mean([1 / n for n in same_action]))


def test_errors_count_what_each_wrong_top1_contradicts(tiny_demo: Path, tmp_path: Path, capsys) -> None:
    queries, gallery, _ = attr_lib._load(_cfg(tiny_demo))
    right = pd.DataFrame({"query_index": queries["query_index"], "rank": 1, "image": queries["image"]})
    assert attr_lib.errors(queries, gallery, right)["wrong_top1"] == 0
    # every query's top-1 is the next query's image: count the contradictions by hand
    shifted = right.assign(image=np.roll(queries["image"].to_numpy(), 1))
    report = attr_lib.errors(queries, gallery, shifted)
    expected_gender = sum(
        gallery[a]["gender"] != gallery[b]["gender"] for a, b in zip(shifted["image"], queries["image"]) if a != b
    )
    assert report["wrong_top1"] == int((shifted["image"] != queries["image"]).sum())
    assert report["slots"]["gender"]["contradicted"] == expected_gender
    assert report["slots"]["action"]["stated"] == 24
    stage = tmp_path / "stage"
    stage.mkdir()
    shifted.to_parquet(stage / "candidates.parquet")
    out = attr_lib.attributes_report(_cfg(tiny_demo, stage=stage, unreadable="top_type", output=tmp_path / "r.json"))
    assert out["errors"] == report and out["ceiling_without"]["unreadable"] == ["top_type"]
    assert "| gender | 24 |" in capsys.readouterr().out and (tmp_path / "r.json").is_file()


def test_bad_input_is_one_sentence(tiny_demo: Path, tmp_path: Path) -> None:
    with pytest.raises(TpasError, match="--unreadable colour: choose from"):
        attr_lib.attributes_report(_cfg(tiny_demo, unreadable="colour"))
    with pytest.raises(TpasError, match="needs a demo set built by"):
        attr_lib.attributes_report(_cfg(tmp_path))
    with pytest.raises(TpasError, match="--stage takes an infer.py output"):
        attr_lib.attributes_report(_cfg(tiny_demo, stage=tmp_path))


@pytest.mark.parametrize("action", vocab.ACTIONS)
def test_drawn_says_what_the_renderer_draws_alike(action: str) -> None:
    """Where `drawn` calls two values one, the renderer gives the same pixels; elsewhere it does not."""
    base = sample_appearance(np.random.default_rng(1))
    partner = sample_appearance(np.random.default_rng(2)) if action in vocab.TWO_PERSON_ACTIONS else None
    changes = [
        ("gender", {"gender": "woman" if base.gender == "man" else "man"}),
        ("bottom_type", {"bottom_type": "jeans"}, {"bottom_type": "trousers"}),
        ("top_type", {"top_type": "jacket"}, {"top_type": "shirt"}),
        ("top_type", {"top_type": "coat"}, {"top_type": "hoodie"}),
        ("bottom_type", {"bottom_type": "shorts"}, {"bottom_type": "skirt"}),
    ]
    for slot, *variants in changes:
        apps = [replace(base, **v) for v in variants] if len(variants) == 2 else [base, replace(base, **variants[0])]
        shown = [{**asdict(a), "action": action} for a in apps]
        spec = [ImageSpec(0, 7, "p", a, action, "park", partner) for a in apps]
        same = np.array_equal(*(np.asarray(render_image(s, seed=0)) for s in spec))
        assert same == (attr_lib.drawn(shown[0], slot) == attr_lib.drawn(shown[1], slot)), (slot, variants)


def test_the_ceiling_as_drawn_splits_twins_the_pixels_cannot_tell_apart() -> None:
    def image(**kw) -> dict:
        return {
            "action": "walking", "gender": "man", "top_colour": "red", "top_type": "jacket", "bottom_colour": "blue",
            "bottom_type": "jeans", "hair_colour": "black", "hair_length": "short", "build": "average",
            "hat": "none", "hat_colour": None, "bag": "none", "bag_colour": None, "scene": "park", **kw,
        }  # fmt: skip

    gallery = {
        "a.jpg": image(),
        "b.jpg": image(top_type="shirt"),  # a side view: drawn as a's twin
        "c.jpg": image(action="standing"),
        "d.jpg": image(action="standing", top_type="shirt"),  # a front view: the collar shows
        "e.jpg": image(gender="woman", hair_length="long"),  # drawn as a's twin but for the hair
    }
    captions = ["A man in a red jacket and blue jeans is walking.", "A man in a red jacket and blue jeans is standing."]
    queries = pd.DataFrame({"query_index": [0, 1], "caption": captions, "image": ["a.jpg", "c.jpg"]})
    assert attr_lib.ceiling(queries, gallery, set())["expected_R@1"] == 100
    # query 0: a, b and e (gender and the side view's type undrawn; the hair is not stated); query 1: c alone
    assert attr_lib.ceiling(queries, gallery, set(), as_drawn=True)["expected_R@1"] == pytest.approx(
        100 * (1 / 3 + 1) / 2
    )
    # with priors short hair says "man": e drops behind a and b, which stay a coin toss
    priors = attr_lib.drawn_priors([image(), image(top_type="shirt"), image(gender="woman", hair_length="long")])
    assert attr_lib.ceiling_with_priors(queries, gallery, priors)["expected_R@1"] == pytest.approx(
        100 * (1 / 2 + 1) / 2
    )
