"""Which caption attributes a demo model gets wrong, and how far reading them could take it:

    python -m tpas.experiments.attributes --stage outputs/<run>          # errors of one run's lists
    python -m tpas.experiments.attributes --unreadable top_type,gender   # the ceiling without them

Demo only: the rendered attributes (annotation/demo_attributes.json) say what each gallery image
shows, and the demo's vocabulary says what each caption states (tpas.demo.vocabulary). From those:

- **ceiling**: the test set's best expected R@1 for a model that reads every stated attribute
  except `--unreadable` ones: each query's top-1 is a random pick among the gallery images that
  agree with everything it can read, so the query scores 1 / (how many agree).
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


def _load(cfg: AttributesConfig) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """The queries (query_index, caption, image = its ground truth) and the gallery's attributes."""
    root = cfg.data_root
    records = root / "annotation/demo_attributes.json"
    if not records.is_file():
        raise TpasError(f"{records} not found: these measures need a demo set built by `python -m tpas.demo`.")
    gallery = {r["gallery"]: r for _, r in read_jsonl_strict(records, ["image"]) if r.get("gallery")}
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
    return queries, gallery


def ceiling(queries: pd.DataFrame, gallery: dict[str, dict[str, Any]], unreadable: set[str]) -> dict[str, Any]:
    """Expected R@1 of a model that reads every stated attribute but `unreadable` (1 / agreeing images)."""
    images = list(gallery.values())
    expected, unique = 0.0, 0
    for caption, image in zip(queries["caption"], queries["image"]):
        shown = gallery[image]
        read = [s for s in stated(caption, shown) if s not in unreadable]
        agreeing = sum(all(_agrees(other, shown, s) for s in read) for other in images)
        expected += 1 / agreeing  # >= 1: the image itself agrees
        unique += agreeing == 1
    return {"expected_R@1": 100 * expected / len(queries), "unique_queries": unique, "queries": len(queries)}


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
    queries, gallery = _load(cfg)
    report: dict[str, Any] = {
        "data_root": str(cfg.data_root),
        "query_file": cfg.query_file,
        "ceiling": ceiling(queries, gallery, set()),
    }
    if unreadable:
        report["ceiling_without"] = {"unreadable": sorted(unreadable), **ceiling(queries, gallery, unreadable)}
    lines = [f"ceiling (every stated attribute read): expected R@1 {report['ceiling']['expected_R@1']:.2f}"]
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
