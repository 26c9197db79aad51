"""Tests for tpas.demo: PAB layout and fields, determinism, captions, twins, directory safety."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from tpas import demo
from tpas.demo import build as demo_build
from tpas.demo import captions, planning, vocabulary
from tpas.errors import TpasError

N_TRAIN, N_TEST, RATIO = 60, 20, 0.5
N_DISTRACTORS = round(RATIO * N_TEST)
SMALL_SHARD = 25  # so the tiny set still spans several shards (25 + 25 + 10)
NAME_RE = re.compile(r"^[A-Z0-9]{15}$")
PAIR_FIELDS = {"image", "caption", "image_id", "hard_i", "hard_c", "hard_i_id", "source_id", "source_caption"}


def _build(path: Path, **kw) -> dict:
    args = {"seed": 0, "n_train": N_TRAIN, "n_test": N_TEST, "distractor_ratio": RATIO, "workers": 1, "progress": False}
    args.update(kw)
    with pytest.MonkeyPatch.context() as mp:
        # planning names the files by shard and build writes the shards: both read SHARD_SIZE
        for module in (planning, demo_build):
            mp.setattr(module, "SHARD_SIZE", SMALL_SHARD)
        return demo.build_demo(path, **args)


def _jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines, f"{path} is empty"
    return [json.loads(line) for line in lines]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "data"
    summary = _build(root)
    return root, summary


@pytest.fixture(scope="module")
def attributes(built) -> dict[str, dict]:
    root, _ = built
    return {r["image"]: r for r in _jsonl(root / "annotation/demo_attributes.json")}


def _has_phrase(caption: str, phrases) -> bool:
    return any(p in caption.lower() for p in phrases)


def test_summary_and_marker(built):
    root, s = built
    assert demo.demo_is_complete(root)
    assert (s["n_train"], s["n_test"], s["n_distractors"]) == (N_TRAIN, N_TEST, N_DISTRACTORS)
    assert s["n_gallery"] == N_TEST + N_DISTRACTORS
    assert s["n_train_normal"] + s["n_train_abnormal"] == N_TRAIN
    assert s["n_train_shards"] == 3 and s["reused"] is False
    marker = json.loads((root / ".complete").read_text())
    assert marker["seed"] == 0 and marker["n_train"] == N_TRAIN and marker["n_test"] == N_TEST


def test_train_records_match_pab(built, attributes):
    root, _ = built
    pair_files = sorted((root / "annotation/train").glob("pair_*.json"))
    assert [p.name for p in pair_files] == ["pair_0.json", "pair_1.json", "pair_2.json"]
    pairs, attrs = [], []
    for k in range(3):
        shard_pairs = _jsonl(root / f"annotation/train/pair_{k}.json")
        shard_attrs = _jsonl(root / f"annotation/train/attr_{k}.json")
        assert len(shard_pairs) == len(shard_attrs) == (SMALL_SHARD if k < 2 else N_TRAIN - 2 * SMALL_SHARD)
        for line, (p, a) in enumerate(zip(shard_pairs, shard_attrs)):
            assert set(p) == PAIR_FIELDS
            assert p["image_id"] == f"{k}_{line}"
            assert re.fullmatch(rf"train/imgs_{k}/(goal|wentrong)/{line}\.jpg", p["image"])
            # attr = the same pair plus exactly one of normal/anomaly, and the scene
            assert {key: a[key] for key in PAIR_FIELDS} == p
            extra = set(a) - PAIR_FIELDS
            assert extra in ({"normal", "scene"}, {"anomaly", "scene"})
            action = a.get("normal", a.get("anomaly"))
            assert ("normal" in a) == (action in demo.NORMAL_ACTIONS)
            assert ("/goal/" in p["image"]) == ("normal" in a)
            assert a["scene"] in demo.SCENES
            y = int(p["source_id"].split("_")[1])
            assert (y == 0) == ("normal" in a) and y in (0, 1, 2)
            assert p["source_caption"].startswith("a person ")
        pairs += shard_pairs
        attrs += shard_attrs
    ids = [p["image_id"] for p in pairs]
    assert len(set(ids)) == len(ids) == N_TRAIN
    by_id = {p["image_id"]: p for p in pairs}
    for p in pairs:
        img_path = root / p["image"]
        with Image.open(img_path) as im:
            assert im.format == "JPEG" and im.size == (64, 128) and im.mode == "RGB"
        # hard negative: an existing pair whose person or action differs
        hard = by_id[p["hard_i_id"]]
        assert hard["image"] == p["hard_i"] and hard["caption"] == p["hard_c"]
        assert (root / p["hard_i"]).is_file() and p["hard_i"] != p["image"]
        me, other = attributes[p["image"]], attributes[p["hard_i"]]
        assert me["action"] != other["action"] or me["person"] != other["person"]
    # about half normal, half abnormal
    n_abnormal = sum("anomaly" in a for a in attrs)
    assert 0.3 * N_TRAIN <= n_abnormal <= 0.7 * N_TRAIN


def test_train_videos_show_one_person_in_several_actions(built, attributes):
    train = [a for a in attributes.values() if a["split"] == "train"]
    videos: dict[int, list[dict]] = {}
    for a in train:
        videos.setdefault(a["video"], []).append(a)
    full = list(videos.values())[:-1]  # the last video may be cut short to hit n_train exactly
    assert full and all(2 <= len(v) <= 4 for v in full)
    for v in full:
        assert len({a["person"] for a in v}) == 1
        assert len({a["action"] for a in v}) == len(v)  # distinct actions
        assert any(a["abnormal"] for a in v) and not all(a["abnormal"] for a in v)
        looks = {tuple(a[k] for k in ("top_colour", "top_type", "bottom_colour", "gender")) for a in v}
        assert len(looks) == 1


def test_test_split_and_challenge_layout(built, attributes):
    root, _ = built
    pairs = _jsonl(root / "annotation/test/pair.json")
    assert len(pairs) == N_TEST
    for n, p in enumerate(pairs):
        assert set(p) == {"image", "image_id", "caption"}
        assert p["image"] == f"test/{n}.jpg" and p["image_id"] == str(n)
        assert isinstance(p["caption"], list) and len(p["caption"]) == 1 and p["caption"][0]
        with Image.open(root / p["image"]) as im:
            assert im.size == (64, 128)
    test_attr = _jsonl(root / "annotation/test/attr.json")
    assert all(("normal" in a) != ("anomaly" in a) for a in test_attr)

    gallery = sorted((root / "challenge/gallery").iterdir())
    names = [g.stem for g in gallery]
    assert len(names) == len(set(names)) == N_TEST + N_DISTRACTORS
    assert all(NAME_RE.match(n) and g.suffix == ".jpg" for n, g in zip(names, gallery))

    raw = (root / "challenge/query_index.txt").read_bytes()
    assert raw.endswith(b"\r\n") and b"\n" not in raw.replace(b"\r\n", b"")
    ids = raw.decode().split("\r\n")[:-1]
    assert len(ids) == len(set(ids)) == N_TEST and all(NAME_RE.match(i) for i in ids)
    queries = _jsonl(root / "challenge/query.json")
    assert [q["query_index"] for q in queries] == ids
    assert all(set(q) == {"query_index", "caption"} and q["caption"] for q in queries)
    heldout = _jsonl(root / "challenge/query_heldout.json")
    assert [q["query_index"] for q in heldout] == ids
    gt = _jsonl(root / "challenge/query_gt.json")
    assert [g["query_index"] for g in gt] == ids
    assert not set(ids) & set(names)  # query ids are not gallery names

    # Each ground-truth gallery image is the very image of that query, with its caption.
    test_by_gallery = {a["gallery"]: a for a in attributes.values() if a["split"] == "test"}
    captions = {p["image"]: p["caption"][0] for p in pairs}
    for q, g in zip(queries, gt):
        assert (root / f"challenge/gallery/{g['image']}.jpg").is_file()
        a = test_by_gallery[g["image"]]
        assert a["query_index"] == q["query_index"] and captions[a["image"]] == q["caption"]
        assert (root / f"challenge/gallery/{g['image']}.jpg").read_bytes() == (root / a["image"]).read_bytes()
    # Distractors are in the gallery but are nobody's answer.
    distractors = {a["gallery"] for a in attributes.values() if a["split"] == "distractor"}
    assert len(distractors) == N_DISTRACTORS and not distractors & {g["image"] for g in gt}


def test_demo_attributes_cover_every_image(built, attributes):
    root, _ = built
    splits = [a["split"] for a in attributes.values()]
    assert splits.count("train") == N_TRAIN and splits.count("test") == N_TEST
    assert splits.count("distractor") == N_DISTRACTORS
    for a in attributes.values():
        assert (root / a["image"]).is_file()
        assert a["action"] in demo.ACTIONS and a["abnormal"] == (a["action"] in demo.ABNORMAL_ACTIONS)
        assert a["top_colour"] in demo.COLOURS and a["scene"] in demo.SCENES
        assert (a["partner"] is not None) == (a["action"] in demo.TWO_PERSON_ACTIONS)
    train_people = {a["person"] for a in attributes.values() if a["split"] == "train"}
    test_people = {a["person"] for a in attributes.values() if a["split"] != "train"}
    assert train_people and test_people and not train_people & test_people


def test_every_caption_states_its_action(built, attributes):
    root, _ = built
    all_a = [p for ps in demo.ACTION_PHRASES.values() for p in ps]
    checked = 0
    for k in range(3):
        for a in _jsonl(root / f"annotation/train/attr_{k}.json"):
            action = a.get("normal", a.get("anomaly"))
            assert _has_phrase(a["caption"], demo.ACTION_PHRASES[action]), a["caption"]
            others = [x for x in demo.ACTIONS if x != action]
            assert not any(_has_phrase(a["caption"], demo.ACTION_PHRASES[o]) for o in others), a["caption"]
            top = attributes[a["image"]]["top_colour"]
            assert top in a["caption"]
            checked += 1
    gt = {g["query_index"]: g["image"] for g in _jsonl(root / "challenge/query_gt.json")}
    by_gallery = {a["gallery"]: a for a in attributes.values() if a["split"] == "test"}
    for q in _jsonl(root / "challenge/query.json"):
        a = by_gallery[gt[q["query_index"]]]
        assert _has_phrase(q["caption"], demo.ACTION_PHRASES[a["action"]]) and a["top_colour"] in q["caption"]
    for q in _jsonl(root / "challenge/query_heldout.json"):
        a = by_gallery[gt[q["query_index"]]]
        assert _has_phrase(q["caption"], demo.HELDOUT_ACTION_PHRASES[a["action"]]), q["caption"]
        assert not _has_phrase(q["caption"], all_a), q["caption"]  # held-out wording never seen in training
        assert a["top_colour"] in q["caption"]
    assert checked == N_TRAIN


def test_heldout_phrases_are_disjoint_from_training_phrases():
    for action in demo.ACTIONS:
        assert len(demo.ACTION_PHRASES[action]) >= 2 and len(demo.HELDOUT_ACTION_PHRASES[action]) >= 2
        for b in demo.HELDOUT_ACTION_PHRASES[action]:
            assert not any(a in b for ps in demo.ACTION_PHRASES.values() for a in ps), b
    assert len(captions._TEMPLATES_A) >= 6 and len(captions._TEMPLATES_B) >= 6


def test_near_twins_are_common_and_separable_by_their_captions():
    queries, distractors = planning._plan_test(0, 2000, 1000)
    twin_share = sum(q.extra["twin_kind"] != "single" for q in queries) / len(queries)
    assert 0.4 <= twin_share <= 0.6
    assert sum("twin_of_group" in d.extra for d in distractors) / len(distractors) >= 0.4
    by_group: dict[int, list] = {}
    for q in queries:
        by_group.setdefault(q.extra["twin_group"], []).append(q)
    kinds = set()
    for members in by_group.values():
        base = members[0]
        for m in members[1:]:
            kinds.add(m.extra["twin_kind"])
            if m.extra["twin_kind"] == "same_person":
                assert m.person == base.person and m.action != base.action and m.appearance == base.appearance
            else:
                attr = m.extra["differs_in"]
                diff = [f for f in vars(base.appearance) if getattr(base.appearance, f) != getattr(m.appearance, f)]
                assert diff == [attr] and m.action == base.action and m.person != base.person
                # both captions have to state the attribute that tells them apart
                assert vocabulary._VARIATION_MENTION[attr] in base.must | {"top"}
    assert kinds == {"same_person", "look_alike"}


def test_same_seed_is_byte_identical_whatever_the_worker_count(built, tmp_path):
    root, _ = built
    again = tmp_path / "again"
    _build(again, workers=2)
    first, second = _tree(root), _tree(again)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first), [k for k in first if first[k] != second[k]][:5]


def test_different_seed_gives_a_different_set(built, tmp_path):
    root, _ = built
    other = tmp_path / "other"
    _build(other, seed=1)
    for rel in ("annotation/train/pair_0.json", "annotation/test/pair.json", "challenge/query_index.txt"):
        assert (root / rel).read_bytes() != (other / rel).read_bytes()
    assert (root / "test/0.jpg").read_bytes() != (other / "test/0.jpg").read_bytes()
    assert {p.name for p in (root / "challenge/gallery").iterdir()}.isdisjoint(
        p.name for p in (other / "challenge/gallery").iterdir()
    )


def test_incomplete_directory_needs_force(tmp_path):
    out = tmp_path / "half"
    (out / "train/imgs_0/goal").mkdir(parents=True)
    (out / "train/imgs_0/goal/0.jpg").write_bytes(b"partial")
    assert not demo.demo_is_complete(out)
    with pytest.raises(TpasError, match="no .complete marker"):
        _build(out)
    assert (out / "train/imgs_0/goal/0.jpg").read_bytes() == b"partial"  # nothing touched
    s = _build(out, force=True)
    assert demo.demo_is_complete(out) and s["reused"] is False
    stray = out / "train/imgs_0/goal/0.jpg"
    assert not stray.exists() or stray.read_bytes() != b"partial"  # wiped, or rewritten by the new build
    for img in (out / "train").rglob("*.jpg"):
        with Image.open(img) as im:
            assert im.size == (64, 128)


def test_complete_directory_is_reused_or_refused(built, tmp_path):
    root, _ = built
    again = _build(root)  # same settings: nothing is rebuilt
    assert again["reused"] is True and again["n_train"] == N_TRAIN
    with pytest.raises(TpasError, match="other settings"):
        _build(root, seed=5)


def test_force_never_wipes_foreign_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "annotation").mkdir()
    with pytest.raises(TpasError, match="refusing to wipe"):
        _build(out, force=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(TpasError, match="n_test"):
        _build(tmp_path / "x", n_test=0)
    with pytest.raises(TpasError, match="workers"):
        _build(tmp_path / "y", workers=0)


def test_cli_builds_and_reports(tmp_path):
    out = tmp_path / "cli"
    runner = CliRunner()
    res = runner.invoke(
        demo.main,
        [
            str(out),
            "--n-train",
            "12",
            "--n-test",
            "6",
            "--image-height",
            "96",
            "--image-width",
            "48",
            "--workers",
            "1",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "12 train pairs" in res.output and "6 test queries" in res.output and "3 distractors" in res.output
    with Image.open(out / "test/0.jpg") as im:
        assert im.size == (48, 96)
    (out / ".complete").unlink()
    res = runner.invoke(demo.main, [str(out), "--n-train", "12", "--n-test", "6", "--no-progress"])
    assert res.exit_code != 0 and "--force" in res.output and "Traceback" not in res.output
    helptext = runner.invoke(demo.main, ["--help"]).output
    for opt in (
        "--seed",
        "--n-train",
        "--n-test",
        "--distractor-ratio",
        "--image-height",
        "--image-width",
        "--workers",
        "--force",
    ):
        assert opt in helptext


def test_contact_sheet(tmp_path):
    path = demo.render_contact_sheet(tmp_path / "sheet.png", per_action=2)
    with Image.open(path) as im:
        assert im.height >= len(demo.ACTIONS) * 128
