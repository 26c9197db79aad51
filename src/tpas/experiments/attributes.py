"""Which caption attributes a demo model gets wrong, and how far reading them could take it:

    python -m tpas.experiments.attributes --stage outputs/<run>          # errors of one run's lists
    python -m tpas.experiments.attributes --unreadable top_type,gender   # the ceiling without them

Demo only: the rendered attributes (annotation/demo_attributes.json) say what each gallery image
shows, and the demo's vocabulary says what each caption states (tpas.demo.vocabulary). From those:

- **ceiling**: the test set's best expected R@1 for a model that reads every stated attribute
  except `--unreadable` ones: each query's top-1 is a random pick among the gallery images that
  agree with everything it can read, so the query scores 1 / (how many agree).
- **ceiling as drawn**: the same for a model that reads only what the renderer draws (`drawn`):
  it cannot see gender, tell jeans from trousers, or a jacket from a shirt in a side view; and
  the same again when that model ranks such look-alikes by the training split's priors (long
  hair says "woman", blue says "jeans"): the best any model can do from the pixels.
- **errors** (with `--stage`, an infer.py output): for each query whose top-1 is wrong, which of
  its caption's stated attributes that top-1 image contradicts, counted per attribute.

Neither reads query_gt.json into anything that trains or tunes; they measure.
"""

# ruff: noqa: RUF009

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tpas.cli import config_command, field
from tpas.data import read_jsonl_strict
from tpas.demo import vocabulary as vocab
from tpas.errors import TpasError
from tpas.io import write_json

# What a caption can state, as (attribute, the rendered fields it pins down). Action and gender are
# in every caption, the top garment too; the rest only where the generator chose to mention them.
SLOTS: dict[str, tuple[str, ...]] = {
    "action": ("action",),
    "gender": ("gender",),
    "top_colour": ("top_colour",),
    "top_type": ("top_type",),
    "bottom_colour": ("bottom_colour",),
    "bottom_type": ("bottom_type",),
    "hair_colour": ("hair_colour",),
    "hair_length": ("hair_length",),
    "build": ("build",),
    "hat": ("hat", "hat_colour"),
    "bag": ("bag", "bag_colour"),
    "scene": ("scene",),
}


@dataclass
class AttributesConfig:
    data_root: Path = field(Path("data/demo"), "A demo set (python -m tpas.demo): its rendered attributes and queries.")
    query_file: str = field("query.json", "Queries under challenge/ (query_heldout.json: the held-out wording).")
    stage: Path | None = field(None, "An infer.py output dir (candidates.parquet) whose top-1 errors to break down.")
    unreadable: str = field(
        "", f"Comma list of attributes the ceiling assumes a model cannot read, from: {', '.join(SLOTS)}."
    )
    output: Path | None = field(None, "Also write the report here (JSON).")


def _said(caption: str, colour: str | None, nouns: tuple[str, ...]) -> bool:
    """`colour`, at most one word, then one of `nouns`: "red jacket", "red zip-up jacket"."""
    alternatives = "|".join(re.escape(n) for n in sorted(nouns, key=len, reverse=True))
    return (
        colour is not None
        and re.search(rf"\b{re.escape(colour)} (?:[\w-]+ )?(?:{alternatives})\b", caption) is not None
    )


def stated(caption: str, shown: dict[str, Any]) -> list[str]:
    """The SLOTS a caption states about the image it was written for (`shown`: its attributes)."""
    caption = caption.lower()
    slots = ["action", "gender", "top_colour", "top_type"]
    if _said(caption, shown["bottom_colour"], vocab._BOTTOM_NOUNS[shown["bottom_type"]]):
        slots += ["bottom_colour", "bottom_type"]
    if f"{shown['hair_colour']} hair" in caption:
        slots.append("hair_colour")
    if f"{shown['hair_length']} {shown['hair_colour']} hair" in caption:
        slots.append("hair_length")
    if any(re.search(rf"\b{re.escape(adj)} ", caption) for adj in vocab._BUILD_ADJ[shown["build"]] if adj):
        slots.append("build")
    if shown["hat"] != "none" and _said(caption, shown["hat_colour"], vocab._HAT_NOUNS[shown["hat"]]):
        slots.append("hat")
    if shown["bag"] != "none" and _said(caption, shown["bag_colour"], vocab._BAG_NOUNS[shown["bag"]]):
        slots.append("bag")
    scenes = (*vocab.SCENE_PHRASES[shown["scene"]], *vocab.HELDOUT_SCENE_PHRASES[shown["scene"]])
    if any(phrase.lower() in caption for phrase in scenes):
        slots.append("scene")
    return slots


def _agrees(image: dict[str, Any], shown: dict[str, Any], slot: str) -> bool:
    return all(image.get(k) == shown.get(k) for k in SLOTS[slot])


DEMO_ATTRIBUTES = "annotation/demo_attributes.json"  # what tpas.demo rendered for each image


def read_demo_attributes(root: Path, required: tuple[str, ...] = ("image",)) -> list[dict[str, Any]]:
    """The rendered attributes of every image of a demo set (one JSON record per line)."""
    path = root / DEMO_ATTRIBUTES
    if not path.is_file():
        raise TpasError(f"{path} not found: this measure needs a demo set built by `python -m tpas.demo`.")
    return [r for _, r in read_jsonl_strict(path, list(required))]


def _load(cfg: AttributesConfig) -> tuple[pd.DataFrame, dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The queries (query_index, caption, image = its ground truth), the gallery's attributes and
    the training split's records."""
    root = cfg.data_root
    records = root / DEMO_ATTRIBUTES
    rows = read_demo_attributes(root)
    gallery = {r["gallery"]: r for r in rows if r.get("gallery")}
    queries = pd.DataFrame(
        r for _, r in read_jsonl_strict(root / "challenge" / cfg.query_file, ["query_index", "caption"])
    )
    truth = pd.DataFrame(r for _, r in read_jsonl_strict(root / "challenge/query_gt.json", ["query_index", "image"]))
    queries = queries.merge(truth, on="query_index", validate="one_to_one")
    missing = sorted(set(queries["image"]) - set(gallery))
    if missing:
        raise TpasError(
            f"{len(missing)} ground-truth images (e.g. {missing[0]}) have no record in {records}; rebuild the demo."
        )
    return queries, gallery, [r for r in rows if r.get("split") == "train"]


# What the renderer (tpas.demo.drawing) draws alike, so that no model can tell it apart from the
# pixels: gender is not drawn at all, jeans are drawn as trousers, and a jacket's zip and a shirt's
# collar only in front views (the actions tpas.demo.poses poses facing the camera).
FRONT_VIEW_ACTIONS = frozenset({"standing", "waving"})
AMBIGUOUS_SLOTS = ("gender", "bottom_type", "top_type")


def drawn(image: dict[str, Any], slot: str) -> tuple:
    """What the pixels show of a slot: values the renderer draws alike become one."""
    values = tuple(image.get(k) for k in SLOTS[slot])
    if slot == "gender":
        return ()
    if slot == "bottom_type" and values == ("jeans",):
        return ("trousers",)
    if slot == "top_type" and values[0] in ("jacket", "shirt") and image.get("action") not in FRONT_VIEW_ACTIONS:
        return ("jacket or shirt",)
    return values


def _evidence(image: dict[str, Any], slot: str) -> tuple:
    """What the pixels show that the generator (tpas.demo.sampling) ties to a slot's undrawn part:
    hair length and skirts to gender, the colour to jeans; a top's type is drawn independently."""
    if slot == "gender":
        return (image.get("hair_length"), drawn(image, "bottom_type"))
    if slot == "bottom_type":
        return (drawn(image, slot), image.get("bottom_colour"))
    return drawn(image, slot)


def drawn_priors(records: list[dict[str, Any]]) -> dict[tuple, float]:
    """P(slot value | what is drawn of it) for the AMBIGUOUS_SLOTS, counted on (training) records."""
    joint, marginal = Counter(), Counter()
    for r in records:
        for slot in AMBIGUOUS_SLOTS:
            joint[slot, _evidence(r, slot), r.get(slot)] += 1
            marginal[slot, _evidence(r, slot)] += 1
    return {key: n / marginal[key[:2]] for key, n in joint.items()}


def ceiling(
    queries: pd.DataFrame, gallery: dict[str, dict[str, Any]], unreadable: set[str], as_drawn: bool = False
) -> dict[str, Any]:
    """Expected R@1 of a model that reads every stated attribute but `unreadable` (1 / agreeing images);
    `as_drawn`: it reads only what the pixels show of each (`drawn`)."""
    images = list(gallery.values())
    agrees = (lambda o, shown, s: drawn(o, s) == drawn(shown, s)) if as_drawn else _agrees
    expected, unique = 0.0, 0
    for caption, image in zip(queries["caption"], queries["image"]):
        shown = gallery[image]
        read = [s for s in stated(caption, shown) if s not in unreadable]
        agreeing = sum(all(agrees(other, shown, s) for s in read) for other in images)
        expected += 1 / agreeing  # >= 1: the image itself agrees
        unique += agreeing == 1
    return {"expected_R@1": 100 * expected / len(queries), "unique_queries": unique, "queries": len(queries)}


def ceiling_with_priors(
    queries: pd.DataFrame, gallery: dict[str, dict[str, Any]], priors: dict[tuple, float]
) -> dict[str, Any]:
    """Expected R@1 of the best model the pixels allow: it reads everything drawn and, among the
    images that agree with that, ranks first those whose drawn evidence makes the caption's undrawn
    words most likely (`drawn_priors`); ties are a random pick."""
    images = list(gallery.values())
    expected = 0.0
    for caption, image in zip(queries["caption"], queries["image"]):
        shown = gallery[image]
        read = stated(caption, shown)
        agreeing = [o for o in images if all(drawn(o, s) == drawn(shown, s) for s in read)]
        hidden = [s for s in read if s in AMBIGUOUS_SLOTS]

        def likelihood(o: dict[str, Any], hidden: list[str] = hidden, shown: dict[str, Any] = shown) -> float:
            p = 1.0
            for s in hidden:
                p *= priors.get((s, _evidence(o, s), shown[s]), 0.0)
            return p

        scores = [likelihood(o) for o in agreeing]
        best = [o for o, p in zip(agreeing, scores) if p >= max(scores) - 1e-12]
        expected += (1 / len(best)) if any(o is shown for o in best) else 0.0
    return {"expected_R@1": 100 * expected / len(queries), "queries": len(queries)}


def errors(queries: pd.DataFrame, gallery: dict[str, dict[str, Any]], candidates: pd.DataFrame) -> dict[str, Any]:
    """Per stated slot: queries stating it, and wrong top-1 images that contradict it."""
    top1 = candidates[candidates["rank"] == 1].set_index("query_index")["image"]
    stating, contradicted, per_error = Counter(), Counter(), Counter()
    wrong = 0
    for q, caption, image in zip(queries["query_index"], queries["caption"], queries["image"]):
        shown = gallery[image]
        slots = stated(caption, shown)
        stating.update(slots)
        guess = top1.get(q)
        if guess is None or guess == image:
            continue
        wrong += 1
        other = gallery.get(guess, {})
        bad = [s for s in slots if not _agrees(other, shown, s)]
        contradicted.update(bad)
        per_error[len(bad)] += 1
    return {
        "queries": len(queries),
        "wrong_top1": wrong,
        "slots": {s: {"stated": stating[s], "contradicted": contradicted[s]} for s in SLOTS},
        "contradictions_per_error": {str(k): per_error[k] for k in sorted(per_error)},
    }


def attributes_report(cfg: AttributesConfig) -> dict[str, Any]:
    unreadable = {s.strip() for s in cfg.unreadable.split(",") if s.strip()}
    unknown = sorted(unreadable - set(SLOTS))
    if unknown:
        raise TpasError(f"--unreadable {','.join(unknown)}: choose from {', '.join(SLOTS)}.")
    queries, gallery, train_records = _load(cfg)
    report: dict[str, Any] = {
        "data_root": str(cfg.data_root),
        "query_file": cfg.query_file,
        "ceiling": ceiling(queries, gallery, set()),
        "ceiling_as_drawn": ceiling(queries, gallery, set(), as_drawn=True),
        "ceiling_as_drawn_with_priors": ceiling_with_priors(queries, gallery, drawn_priors(train_records)),
    }
    if unreadable:
        report["ceiling_without"] = {"unreadable": sorted(unreadable), **ceiling(queries, gallery, unreadable)}
    lines = [
        f"ceiling (every stated attribute read): expected R@1 {report['ceiling']['expected_R@1']:.2f}",
        "ceiling as drawn (gender, jeans against trousers and a side view's jacket against shirt unreadable): "
        f"expected R@1 {report['ceiling_as_drawn']['expected_R@1']:.2f}; with the training split's priors for "
        f"those: {report['ceiling_as_drawn_with_priors']['expected_R@1']:.2f}",
    ]
    if unreadable:
        lines.append(
            f"ceiling without {', '.join(sorted(unreadable))}: expected R@1 {report['ceiling_without']['expected_R@1']:.2f}"
        )
    if cfg.stage is not None:
        path = cfg.stage / "candidates.parquet"
        if not path.is_file():
            raise TpasError(f"{path} not found: --stage takes an infer.py output dir.")
        report["errors"] = err = errors(
            queries, gallery, pd.read_parquet(path, columns=["query_index", "rank", "image"])
        )
        lines += [
            f"{cfg.stage}: {err['wrong_top1']} of {err['queries']} top-1 wrong; per stated attribute, wrong top-1s "
            "that contradict it:",
            "| attribute | queries stating it | wrong top-1 contradicting it | share of errors |",
            "|---|---|---|---|",
        ]
        for slot, n in err["slots"].items():
            share = 100 * n["contradicted"] / max(err["wrong_top1"], 1)
            lines.append(f"| {slot} | {n['stated']} | {n['contradicted']} | {share:.1f}% |")
    if cfg.output is not None:
        write_json(cfg.output, report)
    print("\n".join(lines))
    return report


@config_command(AttributesConfig, help="Demo only: the attribute ceiling, and which attributes a run's errors miss.")
def main(cfg: AttributesConfig) -> None:
    attributes_report(cfg)


if __name__ == "__main__":
    main()
