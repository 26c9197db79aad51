"""Reading PAB as released, and the challenge's name-masked test set.

Layouts (see ../shared/pab-format/README.md):
- train: `annotation/train/attr_<k>.json` (preferred) or `pair_<k>.json`, JSON Lines with
  image, caption, image_id, hard_i, hard_c, hard_i_id, source_id, source_caption and, in attr
  files, `normal` or `anomaly` (the action) and `scene`.
- PAB test: `annotation/test/pair.json` (or attr.json), one record per image with a list of
  captions; every caption is a query whose true image is that record's image.
- challenge: `gallery/*.jpg` (or .jpeg/.png, any case), `query.json` ({query_index, caption} lines), `query_index.txt`
  (answer order) and, for the demo set only, `query_gt.json` ({query_index, image} lines).

Every problem is reported as one sentence naming the file (and line) and the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import GroupShuffleSplit, train_test_split
from tqdm import tqdm

from tpas.errors import TpasError

TRAIN_FIELDS = ["image", "caption", "image_id"]
OPTIONAL_TRAIN_FIELDS = ["hard_i", "hard_c", "hard_i_id", "source_id", "source_caption"]
DEFAULT_DEMO_ROOT = Path("data/demo")


@dataclass
class Problem:
    """One bad record or image: where it is and what is wrong."""

    file: str
    line: int | None
    message: str

    def sentence(self) -> str:
        where = f"{self.file}, line {self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


def _shard_key(path: Path) -> tuple[int, str]:
    match = re.search(r"(\d+)$", path.stem)
    return (int(match.group(1)) if match else -1, path.name)


def _decode_line(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None), or (None, why) for bytes that are not UTF-8."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, (f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield (line number, record or None, error or None) for each non-blank line."""
    # Decoded line by line, so a bad byte is one bad line (with its number), not a traceback.
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            line, error = _decode_line(raw)
            if error:
                yield number, None, error
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, None, f"malformed JSON ({exc.msg}); fix or delete that line"
                continue
            if not isinstance(record, dict):
                yield number, None, "expected a JSON object; fix or delete that line"
                continue
            yield number, record, None


def resolve_image(root: Path, relative: str) -> Path:
    """Join a record's image path to the data root, refusing paths that escape it."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"image path {relative!r} escapes the data root {root}; use a path relative to it")
    return path


def _raise_or_collect(problems: list[Problem], on_bad: str) -> None:
    if problems and on_bad == "fail":
        extra = f" ({len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise TpasError(problems[0].sentence() + extra + "; or pass --on-bad-sample skip to leave bad samples out.")


def train_annotation_files(data_root: Path) -> list[Path]:
    folder = data_root / "annotation" / "train"
    files = sorted(folder.glob("attr_*.json"), key=_shard_key) or sorted(folder.glob("pair_*.json"), key=_shard_key)
    if not files:
        raise TpasError(
            f"{folder}: no attr_*.json or pair_*.json shards; point --data-root at a PAB release "
            f"(or leave it at {DEFAULT_DEMO_ROOT} to build the demo set)."
        )
    return files


def load_train_annotations(data_root: str | Path, on_bad: str = "fail") -> tuple[pd.DataFrame, list[Problem]]:
    """Read every train shard into one table; bad records fail or are skipped (and returned)."""
    root = Path(data_root)
    rows: list[dict] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for path in train_annotation_files(root):
        for line, record, error in iter_jsonl(path):
            where = (str(path), line)
            if error:
                problems.append(Problem(*where, error))
                continue
            missing = [f for f in TRAIN_FIELDS if f not in record]
            if missing:
                problems.append(Problem(*where, f"missing field(s) {', '.join(missing)}"))
                continue
            caption = str(record["caption"]).strip()
            if not caption:
                problems.append(Problem(*where, "empty caption"))
                continue
            image_id = str(record["image_id"])
            if image_id in seen:
                problems.append(Problem(*where, f"duplicate image_id {image_id!r} (first seen in {seen[image_id]})"))
                continue
            try:
                resolve_image(root, record["image"])
                if record.get("hard_i"):
                    resolve_image(root, record["hard_i"])
            except ValueError as exc:
                problems.append(Problem(*where, str(exc)))
                continue
            seen[image_id] = f"{path.name}:{line}"
            action = record.get("anomaly", record.get("normal"))
            source_id = str(record.get("source_id", ""))
            if "anomaly" in record or "normal" in record:
                abnormal = "anomaly" in record
            else:  # pair files: y of "x_y" is 0 for a normal source caption
                abnormal = source_id.rsplit("_", 1)[-1] not in ("", "0")
            rows.append(
                {
                    "image": record["image"],
                    "caption": caption,
                    "image_id": image_id,
                    **{f: (str(record[f]) if record.get(f) is not None else None) for f in OPTIONAL_TRAIN_FIELDS},
                    "action": action,
                    "abnormal": bool(abnormal),
                    "scene": record.get("scene"),
                    "file": path.name,
                    "line": line,
                }
            )
    _raise_or_collect(problems, on_bad)
    if not rows:
        raise TpasError(f"{root / 'annotation' / 'train'}: no usable training pairs; check the shards.")
    return pd.DataFrame(rows), problems


def check_image(path: Path) -> str | None:
    """Return why an image cannot be used, or None when it decodes completely."""
    if not path.is_file():
        return "image file is missing"
    try:
        with Image.open(path) as image:
            image.load()  # decodes fully, so truncated files fail here and not mid-epoch
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        return f"image is unreadable ({type(exc).__name__}: {exc})"
    return None


def check_images(
    frame: pd.DataFrame, data_root: Path, columns: tuple[str, ...] = ("image",), workers: int = 4, progress: bool = True
) -> list[Problem]:
    """Decode every referenced image once; return one Problem per bad row."""
    root = Path(data_root)
    paths = sorted({p for c in columns if c in frame for p in frame[c].dropna()})
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            tqdm(
                pool.map(lambda p: check_image(resolve_image(root, p)), paths),
                total=len(paths),
                desc="checking images",
                disable=not progress,
                leave=False,
            )
        )
    bad = {p: why for p, why in zip(paths, results) if why}
    problems = []
    for row in frame.itertuples(index=False):
        for column in columns:
            value = getattr(row, column, None)
            if value in bad:
                problems.append(
                    Problem(
                        str(Path(data_root) / "annotation" / "train" / row.file),
                        row.line,
                        f"{column} {value}: {bad[value]}",
                    )
                )
                break
    return problems


def video_id(source_id: str | None, fallback: str) -> str:
    """The source video of a pair ("x" of "x_y"); pairs of one video stay on one side of a split."""
    if source_id and "_" in source_id:
        return source_id.rsplit("_", 1)[0]
    return fallback


def split_train_val(
    frame: pd.DataFrame, subset: int | None, val_size: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out `val_size` pairs by source video, then draw a stratified subset of the rest.

    The validation part depends only on (seed, val_size), so runs with different subset sizes
    are validated on the same pairs.
    """
    frame = frame.reset_index(drop=True)
    val = frame.iloc[0:0]
    rest = frame
    if val_size > 0:
        groups = [video_id(s, i) for s, i in zip(frame["source_id"], frame["image_id"])]
        if val_size >= len(frame):
            raise TpasError(f"--val-size {val_size} leaves no training pairs (only {len(frame)}); lower it.")
        splitter = GroupShuffleSplit(n_splits=1, test_size=val_size / len(frame), random_state=seed)
        train_idx, val_idx = next(splitter.split(frame, groups=groups))
        rest, val = frame.iloc[train_idx], frame.iloc[val_idx]
    if subset is not None and subset < len(rest):
        labels = rest["abnormal"]
        stratify = labels if labels.nunique() > 1 and labels.value_counts().min() >= 2 else None
        rest, _ = train_test_split(rest, train_size=subset, random_state=seed, stratify=stratify)
    # A stable order (by original position) keeps the epoch permutations reproducible.
    return rest.sort_index().reset_index(drop=True), val.sort_index().reset_index(drop=True)


@dataclass
class TestSet:
    """Queries (in answer order) and the gallery they rank."""

    queries: pd.DataFrame  # query_index, caption, gt_image (None when unknown)
    gallery: pd.DataFrame  # image (name without extension), path (absolute)
    source: str  # "challenge" or "pab"
    root: Path


def read_jsonl_strict(path: Path, fields: list[str]) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise TpasError(f"{path}: file not found; check --data-root.")
    records = []
    for line, record, error in iter_jsonl(path):
        if error:
            raise TpasError(f"{path}, line {line}: {error}.")
        missing = [f for f in fields if f not in record]
        if missing:
            raise TpasError(f"{path}, line {line}: missing field(s) {', '.join(missing)}; fix that line.")
        records.append((line, record))
    return records


def challenge_dir(data_root: Path) -> Path | None:
    """The folder holding a challenge-format test set under `data_root`, if any."""
    for candidate in (data_root, data_root / "challenge"):
        if (candidate / "query.json").is_file():
            return candidate
    return None


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of each non-blank line of a text file (CRLF or LF)."""
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        text, error = _decode_line(raw)
        if error:
            raise TpasError(f"{path}, line {number}: {error}.")
        if text.strip():
            lines.append((number, text.strip()))
    return lines


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # in any case: cameras and Windows tools write .JPG


def gallery_images(gallery_dir: Path) -> list[Path]:
    """The gallery's image files, sorted by name; an image's name is its file stem."""
    if not gallery_dir.is_dir():
        raise TpasError(f"{gallery_dir}: no such folder; it must hold the gallery images (.jpg, .jpeg or .png).")
    paths = sorted(p for p in gallery_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise TpasError(f"{gallery_dir}: no .jpg, .jpeg or .png images; check --data-root.")
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:  # both would answer to one name
            raise TpasError(
                f"{gallery_dir}: {seen[path.stem].name} and {path.name} have the same name "
                f"{path.stem!r}; keep only one of them."
            )
        seen[path.stem] = path
    return paths


def load_challenge(folder: Path, query_file: str = "query.json") -> TestSet:
    queries: dict[str, str] = {}
    query_line: dict[str, int] = {}
    query_path = folder / query_file
    for line, record in read_jsonl_strict(query_path, ["query_index", "caption"]):
        caption = str(record["caption"]).strip()
        if not caption:
            raise TpasError(f"{query_path}, line {line}: empty caption; fix that line.")
        query_index = str(record["query_index"])
        if query_index in queries:
            raise TpasError(
                f"{query_path}, line {line}: query_index {query_index!r} repeats line "
                f"{query_line[query_index]}; give each query its own id or delete the repeat."
            )
        queries[query_index], query_line[query_index] = caption, line
    order_file = folder / "query_index.txt"
    if order_file.is_file():
        order: list[str] = []
        order_line: dict[str, int] = {}
        for line, query_index in read_lines(order_file):
            if query_index in order_line:  # a repeat would be ranked twice and break sca.py's tables
                raise TpasError(
                    f"{order_file}, line {line}: query {query_index!r} repeats line "
                    f"{order_line[query_index]}; use the query_index.txt that came with {query_file}."
                )
            if query_index not in queries:
                raise TpasError(
                    f"{order_file}, line {line}: query {query_index!r} is not in {query_file}; "
                    f"use the query_index.txt that came with it."
                )
            order.append(query_index)
            order_line[query_index] = line
        # A query the answer order leaves out would be ranked but has no line in answer.txt.
        extra = [q for q in queries if q not in order_line]
        if extra:
            raise TpasError(
                f"{query_path}, line {query_line[extra[0]]}: query {extra[0]!r} is not in {order_file} "
                f"({len(extra)} such); use the query_index.txt that came with {query_file}."
            )
    else:
        order = list(queries)
    gt: dict[str, str] = {}
    gt_file = folder / "query_gt.json"
    if gt_file.is_file():
        gt = {str(r["query_index"]): str(r["image"]) for _, r in read_jsonl_strict(gt_file, ["query_index", "image"])}
    paths = gallery_images(folder / "gallery")
    query_frame = pd.DataFrame(
        {"query_index": order, "caption": [queries[q] for q in order], "gt_image": [gt.get(q) for q in order]}
    )
    gallery = pd.DataFrame({"image": [p.stem for p in paths], "path": [str(p.resolve()) for p in paths]})
    return TestSet(query_frame, gallery, "challenge", folder)


def load_pab_test(data_root: Path) -> TestSet:
    folder = data_root / "annotation" / "test"
    path = folder / "pair.json" if (folder / "pair.json").is_file() else folder / "attr.json"
    query_rows, gallery_rows = [], []
    seen: set[str] = set()
    for line, record in read_jsonl_strict(path, ["image", "image_id", "caption"]):
        image_id = str(record["image_id"])
        if image_id in seen:
            raise TpasError(f"{path}, line {line}: duplicate image_id {image_id!r}.")
        seen.add(image_id)
        try:
            image_path = resolve_image(data_root, record["image"])
        except ValueError as exc:
            raise TpasError(f"{path}, line {line}: {exc}.") from None
        gallery_rows.append({"image": image_id, "path": str(image_path)})
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        for j, caption in enumerate(captions):
            if not str(caption).strip():
                raise TpasError(f"{path}, line {line}: caption {j} is empty; fix that line.")
            query_rows.append({"query_index": f"{image_id}_{j}", "caption": str(caption).strip(), "gt_image": image_id})
    return TestSet(pd.DataFrame(query_rows), pd.DataFrame(gallery_rows), "pab", data_root)


def load_test_set(data_root: str | Path, source: str = "auto", query_file: str = "query.json") -> TestSet:
    """The test queries and gallery: a challenge folder if there is one, else PAB's test split."""
    root = Path(data_root)
    folder = challenge_dir(root)
    if source == "challenge" or (source == "auto" and folder is not None):
        if folder is None:
            raise TpasError(
                f"{root}: no query.json here or in {root / 'challenge'}; point --data-root at the challenge test set."
            )
        return load_challenge(folder, query_file)
    return load_pab_test(root)


def ensure_data(data_root: str | Path, seed: int = 0) -> Path:
    """Build the demo set when the default data dir is empty; otherwise require the data to exist."""
    root = Path(data_root)
    from tpas import demo  # local import: the renderer is only needed for the demo set

    if root.resolve() == DEFAULT_DEMO_ROOT.resolve() and not demo.demo_is_complete(root):
        if root.exists() and any(root.iterdir()):
            raise TpasError(f"{root}: holds an incomplete demo set; delete it and re-run to rebuild it.")
        print(f"{root} is empty: building the demo set (python -m tpas.demo {root})")
        demo.build_demo(root, seed=seed)
    if not root.is_dir():
        raise TpasError(f"{root}: data directory not found; pass --data-root /path/to/PAB.")
    return root


def load_rgb(path: str | Path) -> Image.Image:
    """The image at `path` as RGB; an unreadable file is a TpasError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        why = "missing" if isinstance(exc, FileNotFoundError) else f"unreadable ({type(exc).__name__}: {exc})"
        raise TpasError(f"{path}: image is {why}; replace it with a complete copy or remove it.") from None


def stable_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (independent of Python's hash randomisation)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)
