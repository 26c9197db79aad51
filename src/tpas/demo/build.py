"""Building a demo set on disk: the output directory's safety checks, rendering, annotations, marker.

Also `render_contact_sheet`, one PNG of every action for eyeballing the poses.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from tpas.demo.captions import make_caption
from tpas.demo.drawing import _render_chunk, render_image
from tpas.demo.planning import (
    _STREAM_DISTRACTOR,
    _STREAM_TEST,
    SHARD_SIZE,
    _appearance_fields,
    _plan_test,
    _plan_train,
)
from tpas.demo.sampling import _partner_for, _random_name, sample_appearance
from tpas.demo.vocabulary import (
    ABNORMAL_ACTIONS,
    ACTIONS,
    NORMAL_ACTIONS,
    SCENES,
    TWO_PERSON_ACTIONS,
    ImageSpec,
)
from tpas.errors import TpasError
from tpas.io import write_json, write_jsonl, write_text

FORMAT_VERSION = 1
COMPLETE_MARKER = ".complete"
# Entries a build writes at the top of the data root; --force only ever removes these.
_OWNED_ENTRIES = {"annotation", "train", "test", "challenge", COMPLETE_MARKER}


def demo_is_complete(out_dir: str | Path) -> bool:
    """True when a build finished: the `.complete` marker is written after everything else."""
    return (Path(out_dir) / COMPLETE_MARKER).is_file()


def _marker_params(seed: int, n_train: int, n_test: int, n_distractors: int, image_size: tuple[int, int]) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "n_distractors": n_distractors,
        "image_size": [image_size[0], image_size[1]],
    }


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
            raise TpasError(
                f"{out}: already holds a demo set built with other settings "
                f"({COMPLETE_MARKER}: seed {marker.get('seed')}, {marker.get('n_train')} train, "
                f"{marker.get('n_test')} test); pass --force to rebuild it or pick another directory."
            )
        raise TpasError(
            f"{out}: has files but no {COMPLETE_MARKER} marker (an interrupted or foreign build); "
            f"pass --force to wipe and rebuild it, or pick an empty directory."
        )
    # Only ever delete what a build writes, so a mistyped path cannot wipe unrelated files.
    foreign = [e.name for e in entries if e.name not in _OWNED_ENTRIES and not e.name.startswith(COMPLETE_MARKER + ".")]
    if foreign:
        raise TpasError(
            f"{out}: refusing to wipe it: holds {', '.join(foreign[:5])} that a demo build does not "
            f"write; empty the directory by hand or pick another one."
        )
    (out / COMPLETE_MARKER).unlink(missing_ok=True)  # first, so a crash mid-wipe still reads as incomplete
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        elif e.exists() or e.is_symlink():
            e.unlink()
    return None


def build_demo(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 20000,
    n_test: int = 2000,
    distractor_ratio: float = 0.5,
    image_size: tuple[int, int] = (128, 64),
    workers: int = 2,
    progress: bool = True,
    force: bool = False,
) -> dict:
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
    specs += [
        ImageSpec(
            _STREAM_TEST,
            n,
            q.person,
            q.appearance,
            q.action,
            q.scene,
            q.partner,
            (f"test/{n}.jpg", f"challenge/gallery/{gallery_q[n]}.jpg"),
        )
        for n, q in enumerate(queries)
    ]
    specs += [
        ImageSpec(
            _STREAM_DISTRACTOR,
            k,
            s.person,
            s.appearance,
            s.action,
            s.scene,
            s.partner,
            (f"challenge/gallery/{gallery_d[k]}.jpg",),
        )
        for k, s in enumerate(distractors)
    ]
    _render_all(specs, out, seed, image_size, workers, progress)

    # Annotations, after the images so every referenced file already exists.
    for k in range(0, len(train_records), SHARD_SIZE):
        shard = train_records[k : k + SHARD_SIZE]
        pairs = [{key: v for key, v in r.items() if not key.startswith("_")} for r in shard]
        attrs = [
            {**p, ("normal" if r["_action"] in NORMAL_ACTIONS else "anomaly"): r["_action"], "scene": r["_scene"]}
            for p, r in zip(pairs, shard)
        ]
        write_jsonl(out / f"annotation/train/pair_{k // SHARD_SIZE}.json", pairs)
        write_jsonl(out / f"annotation/train/attr_{k // SHARD_SIZE}.json", attrs)
    test_pairs = [{"image": f"test/{n}.jpg", "image_id": str(n), "caption": [captions[n]]} for n in range(len(queries))]
    write_jsonl(out / "annotation/test/pair.json", test_pairs)
    write_jsonl(
        out / "annotation/test/attr.json",
        [
            {**p, ("normal" if q.action in NORMAL_ACTIONS else "anomaly"): q.action, "scene": q.scene}
            for p, q in zip(test_pairs, queries)
        ],
    )
    write_jsonl(
        out / "challenge/query.json", [{"query_index": query_ids[n], "caption": captions[n]} for n in answer_order]
    )
    write_jsonl(
        out / "challenge/query_heldout.json",
        [{"query_index": query_ids[n], "caption": heldout[n]} for n in answer_order],
    )
    write_jsonl(
        out / "challenge/query_gt.json", [{"query_index": query_ids[n], "image": gallery_q[n]} for n in answer_order]
    )
    # CRLF, exactly like the real challenge file; newline="" keeps Python from translating it.
    write_text(out / "challenge/query_index.txt", "".join(query_ids[n] + "\r\n" for n in answer_order), newline="")

    attributes = train_stats.pop("attributes")
    for n, q in enumerate(queries):
        attributes.append(
            {
                "image": f"test/{n}.jpg",
                "split": "test",
                "person": q.person,
                "action": q.action,
                "abnormal": q.action in ABNORMAL_ACTIONS,
                "scene": q.scene,
                **_appearance_fields(q.appearance),
                "partner": None if q.partner is None else _appearance_fields(q.partner),
                "image_id": str(n),
                "gallery": gallery_q[n],
                "query_index": query_ids[n],
                "twin_group": q.extra["twin_group"],
                "twin_kind": q.extra["twin_kind"],
                "differs_in": q.extra.get("differs_in"),
            }
        )
    for k, s in enumerate(distractors):
        attributes.append(
            {
                "image": f"challenge/gallery/{gallery_d[k]}.jpg",
                "split": "distractor",
                "person": s.person,
                "action": s.action,
                "abnormal": s.action in ABNORMAL_ACTIONS,
                "scene": s.scene,
                **_appearance_fields(s.appearance),
                "partner": None if s.partner is None else _appearance_fields(s.partner),
                "gallery": gallery_d[k],
                "twin_of_group": s.extra.get("twin_of_group"),
                "twin_kind": s.extra["twin_kind"],
                "differs_in": s.extra.get("differs_in"),
            }
        )
    write_jsonl(out / "annotation/demo_attributes.json", attributes)

    summary = {
        **params,
        **train_stats,
        "n_train_shards": -(-n_train // SHARD_SIZE),
        "n_gallery": len(queries) + len(distractors),
        "n_images": len(specs),
        "n_twin_queries": sum(1 for q in queries if q.extra["twin_kind"] != "single"),
    }
    write_json(out / COMPLETE_MARKER, summary)  # last: its presence means the set is whole
    return {**summary, "out_dir": str(out), "seconds": round(time.perf_counter() - t0, 2), "reused": False}


def _render_all(
    specs: list[ImageSpec], out: Path, seed: int, image_size: tuple[int, int], workers: int, progress: bool
) -> None:
    for folder in sorted({str(Path(rel).parent) for spec in specs for rel in spec.outputs}):
        (out / folder).mkdir(parents=True, exist_ok=True)
    chunk = 64
    chunks = [specs[i : i + chunk] for i in range(0, len(specs), chunk)]
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


def render_contact_sheet(
    path: str | Path, seed: int = 0, per_action: int = 8, image_size: tuple[int, int] = (128, 64)
) -> Path:
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
