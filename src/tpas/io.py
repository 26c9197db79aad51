"""Atomic file and stage-directory writing, and small JSON helpers shared by every stage.

Every output file is written to a temporary file in the same directory, then renamed over the
target, so an interrupted run never leaves a half-written file behind. A stage directory
(infer, sca, submit, ensemble outputs) is written as a whole into a temporary sibling and then
swapped in with one atomic exchange (`staged_dir`), so a reader sees either the old complete
stage or the new complete one, never a new candidates.parquet beside an old queries.parquet.
Temporary files and directories left by a killed process are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from tpas.errors import TpasError

MANIFEST_FILE = "manifest.json"  # in a stage dir: what the stage wrote, checked by readers
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(tmp|part)-[^/]*$")
_STALE_AFTER_S = 24 * 3600  # a temp file of a live process is never removed, one this old always


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Remove the temporary siblings of `target` that a killed process left behind (those of a
    running process are kept: it may still be writing); returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        match = _TEMP_NAME.match(path.name)
        if not match or match["name"] != target.name:
            continue
        pid = int(match["pid"])
        try:
            old = time.time() - path.lstat().st_mtime > _STALE_AFTER_S
        except OSError:
            continue
        if (pid != os.getpid() and not _alive(pid)) or old:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(
                missing_ok=True
            )
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it over `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.tmp-", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file private (0600); give it the mode a plain open() would have.
    try:
        yield tmp_path
        # After the writer, not before: some (safetensors' save_file) replace the file with a new 0600 one.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def staged_dir(target: str | Path, outputs: Iterable[str], stage: str) -> Iterator[Path]:
    """Yield an empty temporary sibling of the stage dir `target` to write the whole stage into;
    on success, write its manifest and swap it in at once.

    `outputs` names the files this stage may write: the old dir's files of those names go away
    with it (a stale metrics.json must not outlive the stage that wrote it); any other file in
    the old dir (a tuned.json, a user's notes) is carried over. On an exception nothing changes.
    Where the atomic exchange is unsupported, the old dir is renamed away and the new one renamed
    in (a reader can then find no dir for an instant, never a mixed one).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.part-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        owned = set(outputs) | {MANIFEST_FILE}
        written = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
        manifest = {
            "stage": stage,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {name: (tmp / name).stat().st_size for name in written if (tmp / name).is_file()},
        }
        write_json(tmp / MANIFEST_FILE, manifest)
        if target.is_dir():
            for old in target.iterdir():
                if old.name not in owned and not (tmp / old.name).exists() and not _TEMP_NAME.match(old.name):
                    if old.is_dir():
                        shutil.copytree(old, tmp / old.name, copy_function=os.link, symlinks=True)
                    else:
                        os.link(old, tmp / old.name, follow_symlinks=False)
            if not _exchange(tmp, target):
                aside = target.parent / f".{target.name}.{os.getpid()}.part-old"
                os.replace(target, aside)
                os.replace(tmp, target)
                tmp = aside
        else:
            if target.exists():
                raise TpasError(f"{target}: exists and is not a directory; remove it or choose another output dir.")
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_manifest(stage_dir: str | Path) -> dict | None:
    """The stage's manifest, after checking that its files are the ones the stage wrote (a
    TpasError naming the first that is missing or changed); None for a dir without one (written
    by hand or by tpas before manifests)."""
    stage_dir = Path(stage_dir)
    path = stage_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = read_json(path)
    for name, size in manifest.get("files", {}).items():
        file = stage_dir / name
        if not file.is_file():
            raise TpasError(
                f"{stage_dir}: {name} is missing from this {manifest.get('stage', '')} stage; re-run the "
                f"stage that wrote it."
            )
        if file.stat().st_size != size:
            raise TpasError(
                f"{stage_dir}: {name} is not the file this {manifest.get('stage', '')} stage wrote (it was "
                f"replaced since); re-run the stage rather than mixing files of different runs."
            )
    return manifest


def write_text(target: str | Path, text: str, newline: str | None = None) -> None:
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as fh:
        fh.write(text)


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def json_default(obj: Any) -> Any:
    """json.dumps `default`: dataclasses → dicts, Paths → str, numpy/torch values → lists."""
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, default=json_default, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise TpasError(f"{path}: file not found; check the path or run the stage that writes it.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TpasError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); fix or regenerate the file."
        ) from None


def write_jsonl(target: str | Path, records: list[dict]) -> None:
    write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_parquet(target: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)


def read_parquet(path: str | Path, required: list[str] | None = None, hint: str = "") -> pd.DataFrame:
    """Read a parquet file, checking that the `required` columns are present."""
    path = Path(path)
    if not path.is_file():
        raise TpasError(f"{path}: file not found; {hint or 'run the stage that writes it first'}.")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise TpasError(f"{path}: not a readable parquet file ({exc}); regenerate it.") from None
    missing = [c for c in (required or []) if c not in frame.columns]
    if missing:
        raise TpasError(f"{path}: missing column(s) {', '.join(missing)}; regenerate it with this version of tpas.")
    return frame
