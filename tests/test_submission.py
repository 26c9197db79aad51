import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tpas.errors import TpasError
from tpas.io import write_parquet
from tpas.post.ensemble import EnsembleConfig, run_ensemble
from tpas.post.stage import SCAStageConfig, run_sca_stage
from tpas.schema import (
    CANDIDATE_COLUMNS,
    QUERY_COLUMNS,
    candidates_frame,
    queries_frame,
)
from tpas.submission import (
    SubmitConfig,
    check_answer,
    read_answer,
    run_submit_stage,
    write_answer,
    zip_answer,
)

REPO = Path(__file__).resolve().parents[1]
FORMAT = Path(__file__).parent / "data" / "pab-format"  # the real challenge files
SAMPLE, QUERY_INDEX = FORMAT / "answer_sample.txt", FORMAT / "query_index.txt"


def sample_lines() -> list[str]:
    return SAMPLE.read_bytes().decode("ascii").split("\r\n")[:-1]


def corrupt(tmp_path: Path, edit) -> Path:
    lines = sample_lines()
    edit(lines)
    path = tmp_path / "answer.txt"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


def on_line(index: int, change):
    """An edit of the sample that rewrites one line (0-based index)."""
    return lambda lines: lines.__setitem__(index, change(lines[index]))


def repeat_first_name(line: str) -> str:
    names = line.split()
    names[1] = names[0]
    return " ".join(names)


def only_problem(problems: list[str], *fragments: str) -> None:
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0], problems[0]


def test_official_sample_is_valid():
    assert check_answer(SAMPLE, QUERY_INDEX) == []
    gallery = {n + ".jpg" for line in sample_lines() for n in line.split()}  # names with extension are fine
    assert check_answer(SAMPLE, QUERY_INDEX, gallery=gallery) == []


@pytest.mark.parametrize(
    "edit,fragments",
    [
        (lambda ls: ls.pop(100), ["1977 lines", "1978 queries"]),
        (on_line(4, lambda line: " ".join(line.split()[:9])), ["line 5", "9 names"]),
        (on_line(6, repeat_first_name), ["line 7", "repeats"]),
        (on_line(0, lambda line: line.replace(" ", ".jpg ", 1)), ["line 1", "ZOVZW5GHWX3K7R2.jpg", "extension"]),
        (on_line(9, lambda line: line.replace(" ", "  ", 1)), ["line 10", "double space"]),
        (on_line(2, lambda line: line.replace(" ", "\t", 1)), ["line 3", "tab"]),
        (on_line(3, lambda line: line + " "), ["line 4", "trailing"]),
        (on_line(11, lambda line: ""), ["line 12", "blank"]),
        (on_line(1, lambda line: line.replace(line.split()[3], "abc")), ["line 2", "abc", "15-character"]),
    ],
)
def test_each_corruption_gives_its_problem(tmp_path, edit, fragments):
    only_problem(check_answer(corrupt(tmp_path, edit), QUERY_INDEX), str(tmp_path / "answer.txt"), *fragments)


def test_unknown_name_with_gallery(tmp_path):
    gallery = {n for line in sample_lines() for n in line.split()}
    path = corrupt(tmp_path, on_line(20, lambda line: line.replace(line.split()[5], "ZZZZZZZZZZZZZZZ")))
    assert check_answer(path, QUERY_INDEX) == []  # looks like a challenge name: fine without a gallery
    only_problem(check_answer(path, QUERY_INDEX, gallery=gallery), "line 21", "ZZZZZZZZZZZZZZZ", "not a gallery")


def test_line_endings_and_encoding(tmp_path):
    lines = sample_lines()
    lf = tmp_path / "lf.txt"
    lf.write_bytes(("\n".join(lines) + "\n").encode())
    assert check_answer(lf, QUERY_INDEX) == []
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(("\r\n".join(lines[:10]) + "\n" + "\r\n".join(lines[10:]) + "\r\n").encode())
    only_problem(check_answer(mixed, QUERY_INDEX), "mixed line endings", "1977 CRLF, 1 LF")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe" + SAMPLE.read_bytes())
    only_problem(check_answer(binary, QUERY_INDEX), "not UTF-8")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    only_problem(check_answer(empty), "empty file")


def ranked(n_query: int, per_query: int, seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    rng = np.random.default_rng(seed)
    order = [f"Q{i:04d}" for i in range(n_query)]
    rows = [(q, r, f"IMG{g:012d}") for q in order for r, g in enumerate(rng.choice(500, per_query, replace=False), 1)]
    q, rank, img = (list(c) for c in zip(*rows))
    score = -np.array(rank, dtype=float)
    return candidates_frame(q, img, score, np.full(len(q), np.nan), score, np.array(rank)), order


def test_write_read_round_trip_and_zip(tmp_path):
    cands, order = ranked(30, 12)
    shuffled = cands.sample(frac=1, random_state=1)
    path = tmp_path / "out" / "answer.txt"
    write_answer(shuffled, order[::-1], path)
    data = path.read_bytes()
    assert data.endswith(b"\r\n") and data.count(b"\r\n") == 30 and b"\n" not in data.replace(b"\r\n", b"")
    assert check_answer(path, order[::-1]) == []
    back = read_answer(path, order[::-1])
    assert list(back.columns) == CANDIDATE_COLUMNS and back["itc"].isna().all()
    expected = cands[cands["rank"] <= 10].set_index(["query_index", "rank"])["image"]
    got = back.set_index(["query_index", "rank"])["image"]
    assert got.sort_index().equals(expected.sort_index())
    assert back["query_index"].iloc[0] == order[-1] and (back["score"] == -back["rank"]).all()

    zip_answer(path, tmp_path / "answer.zip")
    with zipfile.ZipFile(tmp_path / "answer.zip") as zf:
        assert zf.namelist() == ["answer.txt"] and zf.read("answer.txt") == data


def test_write_answer_refuses_short_or_missing_queries(tmp_path):
    cands, order = ranked(5, 12)
    short = cands[~((cands["query_index"] == order[2]) & (cands["rank"] > 9))]
    with pytest.raises(TpasError, match=f"{order[2]} has only 9"):
        write_answer(short, order, tmp_path / "answer.txt")
    with pytest.raises(TpasError, match="NOPE"):
        write_answer(cands, order + ["NOPE"], tmp_path / "answer.txt")
    assert not (tmp_path / "answer.txt").exists()


def run_submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "submit.py"), *args], cwd=REPO, capture_output=True, text=True, check=False
    )


def test_submit_check_cli_exit_codes(tmp_path):
    ok = run_submit("--check", str(SAMPLE), "--query-index", str(QUERY_INDEX))
    assert ok.returncode == 0 and ok.stdout.splitlines()[0] == f"{SAMPLE}: valid"
    bad = corrupt(tmp_path, on_line(4, lambda line: " ".join(line.split()[:9])))
    failed = run_submit("--check", str(bad), "--query-index", str(QUERY_INDEX))
    assert failed.returncode == 1
    assert failed.stdout.splitlines()[:2] == [
        f"{bad} line 5: has 9 names; it needs exactly 10.",
        f"{bad}: 1 problem(s)",
    ]


def test_submit_error_is_one_line_without_traceback(tmp_path):
    result = run_submit("--input-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "candidates.parquet: file not found" in result.stderr


class WordEncoder:
    """Bag-of-words embeddings: stands in for MiniLM in the stage test (same captions, same vector)."""

    def encode(self, sentences: list[str], **_: object) -> np.ndarray:
        vocab = sorted({w for s in sentences for w in s.split()})
        return np.array([[float(w in s.split()) for w in vocab] for s in sentences])


def test_sca_then_submit_stages(tmp_path):
    infer = tmp_path / "infer"
    order = [f"Q{i}" for i in range(12)]
    captions = ["a man in a red jacket lying on the ground"] * 2 + [
        "woman jogging",
        "child with a kite",
        "old man on a bench",
        "cyclist in traffic",
        "girl eating ice cream",
        "worker on a ladder",
        "boy kicking a ball",
        "lady holding an umbrella",
        "guard at a gate",
        "dog walker",
    ]
    gallery = [f"G{i:02d}" for i in range(30)]
    gt = ["G00", "G01"] + gallery[2:12]
    rows = []
    for qi, q in enumerate(order):
        images = [gt[qi]] + [g for g in gallery if g != gt[qi]][qi : qi + 11]
        if qi == 1:  # Q1 wrongly prefers Q0's image, less confidently than Q0: SCA should fix it
            images = ["G00", "G01"] + [g for g in gallery if g not in ("G00", "G01")][:10]
        for rank, img in enumerate(images, start=1):
            rows.append((q, rank, img, 0.9 - 0.05 * rank - (0.1 if qi == 1 else 0)))
    q, rank, img, score = (list(c) for c in zip(*rows))
    write_parquet(
        infer / "candidates.parquet",
        candidates_frame(q, img, np.array(score), np.full(len(q), np.nan), np.array(score), np.array(rank)),
    )
    write_parquet(infer / "queries.parquet", queries_frame(order, captions, gt))

    sca_out = tmp_path / "sca"
    summary = run_sca_stage(SCAStageConfig(input_dir=infer, output_dir=sca_out), encoder=WordEncoder())
    for name in (
        "candidates.parquet",
        "queries.parquet",
        "changes.parquet",
        "changes.csv",
        "sca_config.json",
        "metrics.json",
    ):
        assert (sca_out / name).is_file(), name
    assert summary["groups"] == 1 and summary["queries_changed"] == 1
    assert (summary["conflicts_before"], summary["conflicts_after"]) == (1, 0)
    metrics = json.loads((sca_out / "metrics.json").read_text())
    assert metrics["before"]["R@1"] == pytest.approx(11 / 12 * 100) and metrics["after"]["R@1"] == 100.0
    new = pd.read_parquet(sca_out / "candidates.parquet")
    assert list(new.columns) == CANDIDATE_COLUMNS and len(new) == 12 * 12
    assert list(pd.read_parquet(sca_out / "queries.parquet").columns) == QUERY_COLUMNS
    change = pd.read_csv(sca_out / "changes.csv").iloc[0]
    assert change[["query_index", "old_image", "new_image"]].tolist() == ["Q1", "G00", "G01"]
    assert json.loads((sca_out / "sca_config.json").read_text())["combine"] == "or"

    sub_out = tmp_path / "submission"
    result = run_submit_stage(SubmitConfig(input_dir=sca_out, output_dir=sub_out))
    for name in ("answer.txt", "answer.zip", "submit_config.json", "metrics.json"):
        assert (sub_out / name).is_file(), name
    assert check_answer(sub_out / "answer.txt", order) == []
    assert result["metrics"]["R@1"] == 100.0
    assert json.loads((sub_out / "metrics.json").read_text())["queries"] == 12


def _small_answer(tmp_path: Path, names: list[list[str]]) -> tuple[Path, Path, Path]:
    """An answer file, its query index and a challenge folder whose gallery holds G00.jpg .. G11.JPG."""
    gallery = tmp_path / "challenge" / "gallery"
    gallery.mkdir(parents=True)
    for i in range(12):  # names only: --gallery lists the files, it does not decode them
        (gallery / f"G{i:02d}.{'JPG' if i % 2 else 'jpg'}").write_bytes(b"")
    answer, index = tmp_path / "answer.txt", tmp_path / "query_index.txt"
    answer.write_bytes("".join(" ".join(line) + "\r\n" for line in names).encode())
    index.write_text("".join(f"Q{i}\n" for i in range(len(names))))
    return answer, index, gallery.parent


def test_check_with_gallery_finds_unknown_names_and_says_what_it_checked(tmp_path, capsys):
    lines = [[f"G{i:02d}" for i in range(10)], [f"G{i:02d}" for i in range(2, 12)]]
    lines[1][4] = "NOTINGALLERY"
    answer, index, challenge = _small_answer(tmp_path, lines)
    plain = run_submit_stage(SubmitConfig(check=answer, query_index=index))
    assert plain["valid"]  # without a gallery the name cannot be known to be wrong ...
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{answer}: valid" and out[1].startswith("checked: ") and "line count" in out[1]
    assert "names against a gallery (pass --gallery)" in out[2] and "line order" in out[2]
    for folder in (challenge, challenge / "gallery"):  # a challenge folder or its gallery/
        result = run_submit_stage(SubmitConfig(check=answer, query_index=index, gallery=folder))
        assert result["problems"] == [f"{answer} line 2: NOTINGALLERY is not a gallery image name."]
        assert "names against the gallery" in result["checks"]
        assert not any("gallery" in c for c in result["not_checked"]) and "line order" in result["not_checked"][-1]
    with pytest.raises(TpasError, match="no such folder; pass --gallery"):
        run_submit_stage(SubmitConfig(check=answer, gallery=tmp_path / "nowhere"))


def _stage_with(tmp_path: Path, edit) -> Path:
    """A 3-query stage dir (12 candidates each) after `edit(frame)`; itc/itm NaN as in an answer read back."""
    frame, order = ranked(3, 12)
    frame["itc"], frame["itm"] = np.nan, np.nan  # allowed: only score must be finite
    frame = edit(frame)
    d = tmp_path / "stage"
    write_parquet(d / "candidates.parquet", frame)
    write_parquet(d / "queries.parquet", queries_frame(order, [f"caption {q}" for q in order]))
    return d


def _set(frame, row, column, value):
    frame.loc[row, column] = value
    return frame


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda f: _set(f, 12, "score", np.nan),
            "query Q0001 has score nan at rank 1; every candidate needs a finite score",
        ),
        (lambda f: _set(f, 30, "image", f.loc[29, "image"]), "query Q0002 lists image {} more than once"),
        (
            lambda f: _set(f, 15, "rank", 5),
            "query Q0001 has ranks 1, 2, 3, 5, 5, 6, ...; ranks must run 1..k, each once",
        ),
        (
            lambda f: f[f["rank"] != 1].reset_index(drop=True),
            "query Q0000 has ranks 2, 3, 4, 5, 6, 7, ...; ranks must run 1..k",
        ),
    ],
)
def test_sca_submit_and_ensemble_refuse_bad_candidates(tmp_path, edit, message):
    d = _stage_with(tmp_path, edit)
    frame = pd.read_parquet(d / "candidates.parquet")
    expected = f"{d / 'candidates.parquet'}: " + message.format(frame.loc[29, "image"])
    runs = [
        lambda: run_sca_stage(SCAStageConfig(input_dir=d, output_dir=tmp_path / "sca"), encoder=WordEncoder()),
        lambda: run_submit_stage(SubmitConfig(input_dir=d, output_dir=tmp_path / "sub")),
        lambda: run_ensemble(EnsembleConfig(input_dir=[d], output_dir=tmp_path / "ens")),
    ]
    for run in runs:
        with pytest.raises(TpasError) as err:
            run()
        assert str(err.value).startswith(expected), str(err.value)
        assert "\n" not in str(err.value)
    assert not any((tmp_path / name).exists() for name in ("sca", "sub", "ens"))
