"""The data layer reads PAB's layout and names the file and line of every bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fakes import _image, _record, write_train

from tpas.data import (
    check_images,
    load_test_set,
    load_train_annotations,
    split_train_val,
)
from tpas.errors import TpasError


@pytest.fixture
def pab(tmp_path: Path) -> Path:
    records = [_record(i, abnormal=i % 2 == 1, video=i // 2) for i in range(40)]
    write_train(tmp_path, records)
    return tmp_path


def test_reads_attr_shards_with_action_and_label(pab: Path) -> None:
    frame, problems = load_train_annotations(pab)
    assert problems == [] and len(frame) == 40
    assert frame["abnormal"].sum() == 20
    assert set(frame["action"]) == {"lying", "walking"}
    assert frame.loc[0, "image_id"] == "0_0" and frame.loc[0, "line"] == 1


def test_pair_files_take_the_label_from_source_id(tmp_path: Path) -> None:
    records = [_record(i, abnormal=i % 2 == 1) for i in range(4)]
    for r in records:
        r.pop("normal", None), r.pop("anomaly", None)
    write_train(tmp_path, records, name="pair_0.json")
    frame, _ = load_train_annotations(tmp_path)
    assert frame["abnormal"].tolist() == [False, True, False, True]


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("{not json", "line 3: malformed JSON"),
        (json.dumps({"image": "train/x.jpg", "image_id": "9_9"}), "line 3: missing field(s) caption"),
        (json.dumps({"image": "train/x.jpg", "image_id": "9_9", "caption": "  "}), "line 3: empty caption"),
        (json.dumps({"image": "train/x.jpg", "image_id": "0_1", "caption": "dup"}), "line 3: duplicate image_id '0_1'"),
        (
            json.dumps({"image": "../../etc/passwd", "image_id": "9_9", "caption": "c"}),
            "line 3: image path '../../etc/passwd' escapes",
        ),
    ],
)
def test_bad_records_name_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    write_train(tmp_path, [_record(0, False), _record(1, True)], raw_lines=[bad_line])
    with pytest.raises(TpasError) as err:
        load_train_annotations(tmp_path, on_bad="fail")
    assert "attr_0.json" in str(err.value) and expected in str(err.value)
    frame, problems = load_train_annotations(tmp_path, on_bad="skip")
    assert len(frame) == 2 and len(problems) == 1


def test_missing_and_truncated_images_are_found(pab: Path) -> None:
    frame, _ = load_train_annotations(pab)
    (pab / frame.loc[3, "image"]).unlink()
    data = (pab / frame.loc[5, "image"]).read_bytes()
    (pab / frame.loc[5, "image"]).write_bytes(data[: len(data) // 2])
    problems = check_images(frame, pab, progress=False)
    messages = {p.line: p.message for p in problems}
    assert set(messages) == {4, 6}
    assert "missing" in messages[4] and "unreadable" in messages[6]


def test_no_shards_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TpasError, match="no attr_.*pair_.*shards"):
        load_train_annotations(tmp_path)


def test_split_is_seeded_stratified_and_disjoint_by_video(pab: Path) -> None:
    frame, _ = load_train_annotations(pab)
    train, val = split_train_val(frame, subset=10, val_size=10, seed=3)
    again, val_again = split_train_val(frame, subset=10, val_size=10, seed=3)
    other, _ = split_train_val(frame, subset=10, val_size=10, seed=4)
    assert train["image_id"].tolist() == again["image_id"].tolist()
    assert val["image_id"].tolist() == val_again["image_id"].tolist()
    assert train["image_id"].tolist() != other["image_id"].tolist()
    assert len(train) == 10 and train["abnormal"].sum() == 5  # stratified: half abnormal like the data

    def videos(f):
        return {s.rsplit("_", 1)[0] for s in f["source_id"]}

    assert not videos(train) & videos(val)
    _, val_big = split_train_val(frame, subset=20, val_size=10, seed=3)
    assert val_big["image_id"].tolist() == val["image_id"].tolist()  # validation independent of subset size


def test_pab_test_split_expands_caption_lists(tmp_path: Path) -> None:
    folder = tmp_path / "annotation" / "test"
    folder.mkdir(parents=True)
    rows = [
        {"image": "test/1.jpg", "image_id": "1", "caption": ["a", "b"]},
        {"image": "test/2.jpg", "image_id": "2", "caption": ["c"]},
    ]
    (folder / "pair.json").write_text("\n".join(json.dumps(r) for r in rows))
    test = load_test_set(tmp_path)
    assert test.source == "pab"
    assert test.queries["query_index"].tolist() == ["1_0", "1_1", "2_0"]
    assert test.queries["gt_image"].tolist() == ["1", "1", "2"]
    assert test.gallery["image"].tolist() == ["1", "2"]


def test_challenge_folder_follows_query_index_order(tmp_path: Path) -> None:
    folder = tmp_path / "challenge"
    for name in ("AAA", "BBB", "CCC"):
        _image(folder / "gallery" / f"{name}.jpg")
    (folder / "query.json").write_text('{"query_index": "q1", "caption": "x"}\n{"query_index": "q2", "caption": "y"}\n')
    (folder / "query_index.txt").write_bytes(b"q2\r\nq1\r\n")
    test = load_test_set(tmp_path)
    assert test.source == "challenge"
    assert test.queries["query_index"].tolist() == ["q2", "q1"]
    assert test.queries["gt_image"].isna().all()
    assert sorted(test.gallery["image"]) == ["AAA", "BBB", "CCC"]
    (folder / "query_index.txt").write_bytes(b"q2\r\nq9\r\n")
    with pytest.raises(TpasError, match="query 'q9' is not in query.json"):
        load_test_set(tmp_path)


def test_atomic_write_leaves_no_temp_file_and_normal_mode(tmp_path: Path) -> None:
    import os

    from tpas.io import write_text

    target = tmp_path / "out" / "file.txt"
    write_text(target, "hello")
    assert target.read_text() == "hello" and [p.name for p in target.parent.iterdir()] == ["file.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def _challenge(folder: Path, query_ids: list[str], order: list[str]) -> None:
    _image(folder / "gallery" / "AAA.jpg")
    (folder / "query.json").write_text(
        "".join(json.dumps({"query_index": q, "caption": f"person {q}"}) + "\n" for q in query_ids)
    )
    (folder / "query_index.txt").write_text("".join(q + "\r\n" for q in order))


def test_gallery_takes_jpg_jpeg_and_png_in_any_case(tmp_path: Path) -> None:
    folder = tmp_path / "challenge"
    _challenge(folder, ["q1"], ["q1"])
    for name in ("BBB.JPG", "CCC.jpeg", "DDD.PNG", "EEE.Jpeg", "FFF.png"):
        _image(folder / "gallery" / name)
    (folder / "gallery" / "notes.txt").write_text("not an image")
    gallery = load_test_set(tmp_path).gallery
    assert gallery["image"].tolist() == ["AAA", "BBB", "CCC", "DDD", "EEE", "FFF"]
    assert all(Path(p).is_file() for p in gallery["path"])
    _image(folder / "gallery" / "AAA.png")  # a second file answering to the name AAA
    with pytest.raises(TpasError, match=r"AAA\.jpg and AAA\.png have the same name 'AAA'; keep only one"):
        load_test_set(tmp_path)


@pytest.mark.parametrize(
    "query_ids, order, expected",
    [
        (["q1", "q2", "q3"], ["q1", "q2"], r"query\.json, line 3: query 'q3' is not in .*query_index\.txt"),
        (["q1", "q2"], ["q1", "q2", "q1"], r"query_index\.txt, line 3: query 'q1' repeats line 1"),
        (["q1", "q2", "q1"], ["q1", "q2"], r"query\.json, line 3: query_index 'q1' repeats line 1"),
    ],
)
def test_query_file_and_query_index_must_list_the_same_ids_once(
    tmp_path: Path, query_ids: list[str], order: list[str], expected: str
) -> None:
    _challenge(tmp_path, query_ids, order)
    with pytest.raises(TpasError, match=expected):
        load_test_set(tmp_path)


def test_non_utf8_bytes_name_the_file_and_line(tmp_path: Path) -> None:
    records = [_record(0, False), _record(1, True)]
    write_train(tmp_path, records)
    shard = tmp_path / "annotation" / "train" / "attr_0.json"
    lines = shard.read_bytes().splitlines()
    shard.write_bytes(b"\n".join([lines[0], lines[1].replace(b"person", b"p\xe9rson")]) + b"\n")
    with pytest.raises(TpasError, match=r"attr_0\.json, line 2: not UTF-8 text \(byte 0xe9 at column \d+\)"):
        load_train_annotations(tmp_path)
    frame, problems = load_train_annotations(tmp_path, on_bad="skip")
    assert len(frame) == 1 and problems[0].line == 2

    folder = tmp_path / "challenge"
    _challenge(folder, ["q1", "q2"], ["q1", "q2"])
    (folder / "query_index.txt").write_bytes(b"q1\r\nq\xff2\r\n")
    with pytest.raises(TpasError, match=r"query_index\.txt, line 2: not UTF-8"):
        load_test_set(tmp_path)
    (folder / "query_index.txt").write_bytes(b"q1\r\nq2\r\n")
    (folder / "query.json").write_bytes(
        b'{"query_index": "q1", "caption": "x"}\n{"query_index": "q2", "caption": "\xff"}\n'
    )
    with pytest.raises(TpasError, match=r"query\.json, line 2: not UTF-8"):
        load_test_set(tmp_path)


def test_load_rgb_names_an_unreadable_image_and_decodes_as_pil(tmp_path: Path) -> None:
    from PIL import Image

    from tpas.data import load_rgb

    good = tmp_path / "good.jpg"
    Image.effect_noise((64, 48), 60).convert("RGB").save(good, quality=90)
    with Image.open(good) as image:
        assert load_rgb(good).tobytes() == image.convert("RGB").tobytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(TpasError, match=re.escape(str(cut)) + r": image is unreadable \(OSError: .*\); replace it"):
        load_rgb(cut)
    with pytest.raises(TpasError, match=re.escape(f"{tmp_path / 'nope.jpg'}: image is missing")):
        load_rgb(tmp_path / "nope.jpg")
