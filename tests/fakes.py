"""Small hand-made PAB layouts for tests (the demo renderer has its own tests)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def _image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 32), colour).save(path)


def _record(i: int, abnormal: bool, video: int | None = None, caption: str = "person {i} walking") -> dict:
    video = i if video is None else video
    rec = {
        "image": f"train/imgs_0/{'wentrong' if abnormal else 'goal'}/{i}.jpg",
        "caption": caption.format(i=i),
        "image_id": f"0_{i}",
        "hard_i": f"train/imgs_0/goal/{(i + 1) % 40}.jpg",
        "hard_c": "other",
        "hard_i_id": f"0_{(i + 1) % 40}",
        "source_id": f"{video}_{1 if abnormal else 0}",
        "source_caption": "a video",
        "scene": "street",
    }
    rec["anomaly" if abnormal else "normal"] = "lying" if abnormal else "walking"
    return rec


def write_train(root: Path, records: list[dict], name: str = "attr_0.json", raw_lines: list[str] | None = None) -> None:
    folder = root / "annotation" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + (raw_lines or [])
    (folder / name).write_text("\n".join(lines) + "\n")
    for r in records:
        for key in ("image", "hard_i"):
            if not (root / r[key]).exists() and ".." not in r[key]:
                _image(root / r[key])


def write_coloured_train(root: Path, n: int = 40, caption: str = "person {i} walking") -> Path:
    """n training pairs (every other one abnormal, two per source video) whose images are four
    distinct flat colours, so rankings are not ties everywhere; `caption` is formatted with i."""
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (240, 240, 40)]
    records = [_record(i, abnormal=i % 2 == 1, video=i // 2, caption=caption) for i in range(n)]
    write_train(root, records)
    for i, r in enumerate(records):
        _image(root / r["image"], colours[i % 4])
    return root


# train.py settings for a tiny run in seconds (with data_root and runs_dir added). threads=1: on a
# shared, loaded 2-core machine two OpenMP threads per process are ~8x slower.
TINY_TRAIN = {
    "model": "tiny",
    "subset": 24,
    "val_size": 8,
    "batch_size": 8,
    "epochs": 2,
    "workers": 0,
    "progress": False,
    "save_every": 2,
    "threads": 1,
}
