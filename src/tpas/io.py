"""Atomic file writing and small JSON helpers shared by every stage.

Every output is written to a temporary file in the same directory, then renamed over the
target, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from tpas.errors import TpasError


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it over `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file private (0600); give it the mode a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        # After the writer, not before: some (safetensors' save_file) replace the file with a new 0600 one.
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
        raise TpasError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); fix or regenerate the file.") from None


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
