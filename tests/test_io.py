"""Atomic files and stage directories (tpas.io): a reader sees the old complete stage or the new one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpas import io as io_lib
from tpas.errors import TpasError
from tpas.io import (
    MANIFEST_FILE,
    check_manifest,
    remove_stale_temps,
    staged_dir,
    write_text,
)


def _stage(path: Path, marker: str, outputs=("a.txt", "b.txt", "metrics.json"), metrics: bool = True) -> None:
    with staged_dir(path, outputs, "test") as part:
        write_text(part / "a.txt", f"a {marker}")
        write_text(part / "b.txt", f"b {marker}")
        if metrics:
            write_text(part / "metrics.json", "{}")


def _temps(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False])
def test_a_stage_dir_is_swapped_in_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:  # a system without renameat2's RENAME_EXCHANGE: two renames
        monkeypatch.setattr(io_lib, "_exchange", lambda a, b: False)
    stage = tmp_path / "out"
    _stage(stage, "old")
    write_text(stage / "tuned.json", "{}")  # not this stage's: it must survive
    _stage(stage, "new", metrics=False)  # the new run has no metrics: the old one must not linger
    assert sorted(p.name for p in stage.iterdir()) == ["a.txt", "b.txt", MANIFEST_FILE, "tuned.json"]
    assert (stage / "a.txt").read_text() == "a new" and (stage / "b.txt").read_text() == "b new"
    assert check_manifest(stage)["files"] == {"a.txt": 5, "b.txt": 5}
    assert _temps(tmp_path) == []


def test_a_failed_stage_leaves_the_old_one_untouched(tmp_path: Path) -> None:
    stage = tmp_path / "out"
    _stage(stage, "old")
    with pytest.raises(RuntimeError), staged_dir(stage, ["a.txt"], "test") as part:
        write_text(part / "a.txt", "a half")
        raise RuntimeError("killed")
    assert (stage / "a.txt").read_text() == "a old" and check_manifest(stage) is not None
    assert _temps(tmp_path) == []


def test_a_reader_refuses_files_of_two_runs(tmp_path: Path) -> None:
    stage = tmp_path / "out"
    _stage(stage, "old")
    (stage / "b.txt").write_text("b from another run, longer")
    with pytest.raises(TpasError, match=r"b.txt is not the file this test stage wrote .*re-run the stage"):
        check_manifest(stage)
    (stage / "b.txt").unlink()
    with pytest.raises(TpasError, match="b.txt is missing"):
        check_manifest(stage)
    assert check_manifest(tmp_path) is None  # a dir without a manifest (by hand, or older tpas) is read as it is


def test_temps_left_by_a_killed_process_are_removed_by_the_next_writer(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    pid = int(dead.stdout)  # that process has exited
    (tmp_path / f".out.{pid}.part-x1").mkdir()
    (tmp_path / f".out.{pid}.part-x1" / "a.txt").write_text("half")
    (tmp_path / f".a.txt.{pid}.tmp-x2").write_text("half")
    live = tmp_path / f".out.{os.getppid()}.part-x3"  # a running process may still be writing it
    live.mkdir()
    _stage(tmp_path / "out", "new")
    assert not (tmp_path / f".out.{pid}.part-x1").exists() and live.exists()
    assert remove_stale_temps(tmp_path / "a.txt") == [tmp_path / f".a.txt.{pid}.tmp-x2"]


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "f.txt", "x")
        _stage(tmp_path / "out", "new")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "a.txt").stat().st_mode & 0o777 == 0o644
