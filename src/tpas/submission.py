"""The TPAS challenge answer file: write, zip, check, read back.

answer.txt has one line per query, in query_index.txt order; each line holds exactly 10
gallery names (no ".jpg"), separated by single spaces, best first, no repeats. The official
sample uses CRLF line endings, so we write CRLF; the checker accepts LF too, but not a mix.
"""
# ruff: noqa: RUF009  (tpas.cli.field() defaults carry the --help text, as in every config)

from __future__ import annotations

import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tpas.cli import field
from tpas.errors import TpasError
from tpas.io import atomic_path, staged_dir, write_json, write_text
from tpas.metrics import format_metrics, ranking_metrics
from tpas.schema import (
    CANDIDATES_FILE,
    candidates_frame,
    ground_truth,
    read_candidates,
    read_queries,
)

ANSWER_FILE = "answer.txt"
SUBMIT_OUTPUTS = (ANSWER_FILE, "answer.zip", "submit_config.json", "metrics.json")
CHALLENGE_NAME = re.compile(r"[A-Z0-9]{15}")


def read_query_index(path: Path) -> list[str]:
    """Query ids from query_index.txt (CRLF or LF), in answer order."""
    path = Path(path)
    if not path.is_file():
        raise TpasError(f"{path}: file not found; pass the challenge's query_index.txt to --query-index.")
    try:
        ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise TpasError(f"{path}: not UTF-8 text; pass the challenge's query_index.txt to --query-index.") from None
    if "" in ids[:-1] or not ids or ids == [""]:
        raise TpasError(f"{path}: empty or has blank lines; it must list one query id per line.")
    ids = [i for i in ids if i]
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise TpasError(f"{path}: query id {repeated[0]} appears more than once; use the official query_index.txt.")
    return ids


def _answer_lists(candidates: pd.DataFrame, query_order: list[str], path: Path, per_line: int) -> list[list[str]]:
    frame = candidates[["query_index", "rank", "image"]].astype({"query_index": str, "image": str})
    frame = frame.sort_values(["query_index", "rank"], kind="stable").drop_duplicates(["query_index", "image"])
    lists = frame.groupby("query_index", sort=False)["image"].agg(lambda s: s.tolist()[:per_line]).to_dict()
    missing = [q for q in query_order if q not in lists]
    if missing:
        raise TpasError(
            f"{path}: {len(missing)} query id(s) (e.g. {missing[0]}) have no candidates; "
            "run inference on the same query set as the query order."
        )
    short = [q for q in query_order if len(lists[q]) < per_line]
    if short:
        raise TpasError(
            f"{path}: query {short[0]} has only {len(lists[short[0]])} distinct candidates "
            f"({len(short)} queries short of {per_line}); re-run inference with top-k ≥ {per_line}."
        )
    return [lists[q] for q in query_order]


def write_answer(candidates: pd.DataFrame, query_order: list[str], path: Path, per_line: int = 10) -> None:
    """Write answer.txt (CRLF, like the official sample) atomically: the first `per_line` names per query."""
    lines = _answer_lists(candidates, query_order, Path(path), per_line)
    write_text(path, "".join(" ".join(names) + "\r\n" for names in lines), newline="")


def zip_answer(answer_path: Path, zip_path: Path) -> None:
    """Zip answer.txt at the archive root (what the challenge server expects), atomically."""
    with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(answer_path, arcname=ANSWER_FILE)


def check_answer(
    path: Path, query_index: Path | list[str] | None = None, gallery: set[str] | None = None, per_line: int = 10
) -> list[str]:
    """Problems with an answer file, one sentence each naming file and line; empty list = valid.

    `query_index` (file or ids) fixes the expected line count; `gallery` (names, with or without
    an image extension) makes unknown names an error. Without a gallery, names are checked against
    the challenge pattern (15 of A-Z0-9) only when most names in the file follow it. The order of
    the lines cannot be checked: a line carries no query id (see `check_scope`).
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path}: file not found."]
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as plain ASCII."]
    if not text.strip():
        return [f"{path}: empty file; it must hold one line of {per_line} names per query."]
    problems: list[str] = []
    if text.startswith("\ufeff"):
        problems.append(f"{path}: starts with a byte-order mark; save it as plain ASCII without BOM.")
        text = text[1:]

    if not text.isascii():
        first = next(i for i, line in enumerate(text.splitlines(), start=1) if not line.isascii())
        problems.append(f"{path} line {first}: contains non-ASCII characters; gallery names are plain ASCII.")
    raw = text.split("\n")
    if raw[-1] == "":  # the final line terminator ends the last line; it does not start a new one
        raw.pop()
    terminated = raw if text.endswith("\n") else raw[:-1]
    crlf = sum(line.endswith("\r") for line in terminated)
    lf = len(terminated) - crlf
    if crlf and lf:
        problems.append(f"{path}: mixed line endings ({crlf} CRLF, {lf} LF); use CRLF on every line.")
    lines = [line.removesuffix("\r") for line in raw]

    if query_index is not None:
        expected = len(read_query_index(query_index) if isinstance(query_index, (str, Path)) else query_index)
        if len(lines) != expected:
            problems.append(
                f"{path}: has {len(lines)} lines but the query index has {expected} queries; "
                "write one line per query, in query_index.txt order."
            )

    names_by_line = [line.split() for line in lines]
    all_names = [n for names in names_by_line for n in names]
    known = None
    if gallery is not None:
        # imported here: tpas.data's own imports (sklearn) would slow every --check
        from tpas.data import IMAGE_EXTENSIONS

        known = {Path(g).stem if Path(g).suffix.lower() in IMAGE_EXTENSIONS else g for g in gallery}
    # Only hold names to the challenge pattern when the file is evidently a challenge answer.
    pattern = known is None and sum(bool(CHALLENGE_NAME.fullmatch(n)) for n in all_names) > len(all_names) / 2

    for number, (line, names) in enumerate(zip(lines, names_by_line), start=1):
        problems += _line_problems(f"{path} line {number}", line, names, per_line, known, pattern)
    return problems


def _line_problems(
    where: str, line: str, names: list[str], per_line: int, known: set[str] | None, pattern: bool
) -> list[str]:
    """One answer line's faults: blank, spacing, name count, repeats, extensions, unknown names."""
    if not names:
        return [f"{where}: is blank; every query needs {per_line} names."]
    problems = []
    if "\t" in line:
        problems.append(f"{where}: contains a tab; separate names with single spaces.")
    if "  " in line:
        problems.append(f"{where}: contains a double space; separate names with single spaces.")
    if line != line.strip():
        problems.append(f"{where}: has leading or trailing whitespace; remove it.")
    if "\r" in line:
        problems.append(f"{where}: contains a stray carriage return; use CRLF only at line ends.")
    if len(names) != per_line:
        problems.append(f"{where}: has {len(names)} names; it needs exactly {per_line}.")
    for name, count in Counter(names).items():
        if count > 1:
            problems.append(f"{where}: repeats {name}; each name may appear once per line.")
    for name in dict.fromkeys(names):
        stem, dot, ext = name.rpartition(".")
        if dot and stem:
            problems.append(f"{where}: {name} has a file extension; write the name without .{ext}.")
            name = stem
        if known is not None and name not in known:
            problems.append(f"{where}: {name} is not a gallery image name.")
        elif pattern and not CHALLENGE_NAME.fullmatch(name):
            problems.append(f"{where}: {name} is not a 15-character A-Z/0-9 gallery name.")
    return problems


def gallery_names(folder: Path) -> set[str]:
    """The image names of a gallery folder, or of a challenge folder's gallery/."""
    # imported here: tpas.data's own imports (sklearn) would slow every --check
    from tpas.data import gallery_images

    folder = Path(folder)
    if not folder.is_dir():
        raise TpasError(
            f"{folder}: no such folder; pass --gallery a gallery folder or a challenge folder holding gallery/."
        )
    return {p.stem for p in gallery_images(folder / "gallery" if (folder / "gallery").is_dir() else folder)}


def check_scope(query_index: bool, gallery: bool, per_line: int = 10) -> tuple[list[str], list[str]]:
    """What check_answer verified and what it could not, given a query index and/or a gallery."""
    checked = [
        "UTF-8 ASCII text",
        "one kind of line ending",
        f"{per_line} distinct names per line, single spaces",
        "no file extensions",
    ]
    unchecked = []
    if query_index:
        checked.append("line count against the query index")
    else:
        unchecked.append("line count (pass --query-index)")
    if gallery:
        checked.append("names against the gallery")
    else:
        checked.append("names look like challenge names (15 of A-Z/0-9, when most do)")
        unchecked.append("names against a gallery (pass --gallery)")
    # Lines carry no query ids, so a file whose lines are shuffled is indistinguishable from a right one.
    unchecked.append(
        "line order (a line names no query; write the file with submit.py --query-index so line i "
        "answers query i of query_index.txt)"
    )
    return checked, unchecked


def read_answer(path: Path, query_order: list[str]) -> pd.DataFrame:
    """An answer file as a candidates table (itc/itm NaN, score = -rank) so it can be scored."""
    path = Path(path)
    if not path.is_file():
        raise TpasError(f"{path}: file not found; write it with `python submit.py` first.")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != len(query_order):
        raise TpasError(
            f"{path}: has {len(lines)} lines for {len(query_order)} queries; "
            "check it with `python submit.py --check` and use the matching query index."
        )
    names = [line.split() for line in lines]
    counts = np.array([len(n) for n in names])
    rank = np.concatenate([np.arange(1, c + 1) for c in counts]) if counts.sum() else np.empty(0)
    nan = np.full(int(counts.sum()), np.nan)
    return candidates_frame(
        list(np.repeat(np.asarray(query_order, dtype=object), counts)),
        [n for row in names for n in row],
        nan,
        nan,
        -rank,
        rank,
    )


@dataclass
class SubmitConfig:
    input_dir: Path = field(Path("outputs/sca"), help="Stage dir to read: candidates.parquet + queries.parquet.")
    output_dir: Path = field(Path("outputs/submission"), help="Where to write answer.txt, answer.zip and metrics.")
    query_index: Path | None = field(
        None, help="Official query_index.txt giving the answer order (default: the order of queries.parquet)."
    )
    check: Path | None = field(
        None,
        help="Only validate this answer file and exit 0 if valid, 1 if not: its format, "
        "its line count against --query-index and its names against --gallery "
        "when given. The line order cannot be checked: a line names no query.",
    )
    gallery: Path | None = field(
        None,
        help="Gallery folder (or a challenge folder holding gallery/) whose image names "
        "every answer name must be (default: names are only checked for the "
        "challenge's 15-character pattern).",
    )


def run_submit_stage(cfg: SubmitConfig) -> dict[str, Any]:
    """Write answer.txt + answer.zip (or, with cfg.check, only validate a file); returns the summary."""
    gallery = gallery_names(cfg.gallery) if cfg.gallery is not None else None
    if cfg.check is not None:
        problems = check_answer(cfg.check, cfg.query_index, gallery)
        for problem in problems:
            print(problem)
        print(f"{cfg.check}: {'valid' if not problems else f'{len(problems)} problem(s)'}")
        checked, unchecked = check_scope(cfg.query_index is not None, gallery is not None)
        print(f"checked: {'; '.join(checked)}")
        print(f"not checked: {'; '.join(unchecked)}")
        return {
            "checked": str(cfg.check),
            "valid": not problems,
            "problems": problems,
            "checks": checked,
            "not_checked": unchecked,
        }

    candidates = read_candidates(cfg.input_dir)
    queries = read_queries(cfg.input_dir)
    if cfg.query_index is not None:
        order = read_query_index(cfg.query_index)
    else:
        order = queries["query_index"].astype(str).tolist()
    missing = set(order) - set(candidates["query_index"].astype(str))
    if missing:
        source = cfg.query_index or Path(cfg.input_dir) / "queries.parquet"
        raise TpasError(
            f"{source}: {len(missing)} query id(s) (e.g. {min(missing)}) have no candidates in "
            f"{Path(cfg.input_dir) / CANDIDATES_FILE}; run inference on the same query set."
        )

    out = Path(cfg.output_dir)
    answer = out / ANSWER_FILE
    summary: dict[str, Any] = {"queries": len(order), "answer": str(answer), "zip": str(out / "answer.zip")}
    line = f"submit: {len(order)} queries → {answer} (+ answer.zip)"
    gt = ground_truth(queries)
    if gt is not None:
        wanted = set(order)
        gt = {q: img for q, img in gt.items() if q in wanted}
    # the whole stage dir at once: answer.txt, answer.zip and metrics always belong together
    with staged_dir(out, SUBMIT_OUTPUTS, "submit") as part:
        write_answer(candidates, order, part / ANSWER_FILE)
        problems = check_answer(part / ANSWER_FILE, order, gallery)
        if problems:  # e.g. candidate names with spaces or extensions: refuse to hand in a bad file
            raise TpasError(
                f"{problems[0].replace(str(part / ANSWER_FILE), str(answer))} Fix the candidate image names "
                f"in {Path(cfg.input_dir) / CANDIDATES_FILE}."
            )
        zip_answer(part / ANSWER_FILE, part / "answer.zip")
        write_json(part / "submit_config.json", cfg)
        if gt:
            metrics = ranking_metrics(read_answer(part / ANSWER_FILE, order), gt)
            write_json(part / "metrics.json", metrics)
            summary["metrics"] = metrics
            line += f"; {format_metrics(metrics)}"
    print(line)
    return summary
