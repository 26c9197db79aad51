"""File schemas shared by the stages (infer → sca → submit).

A stage directory (outputs/<stage>/) holds:
- candidates.parquet: one row per (query, candidate), sorted by query order then rank.
    query_index str, rank int32 (1 = best), image str (gallery name, no extension),
    itc float32 (contrastive cosine similarity), itm float32 (ITM log-odds: match minus no-match
    logit; NaN when not re-ranked), score float32 (the score the rank was sorted by, under
    infer.py --score's rule, tpas.scores; higher is better).
- queries.parquet: one row per query, in answer order.
    query_index str, position int32 (0-based answer order), caption str,
    gt_image str or null (ground truth, when known).
- <stage>_config.json: the resolved config that wrote the directory.
- metrics.json: metrics, when ground truth is known.
- manifest.json: {stage, written, files: {name: bytes}}, written last by tpas.io.staged_dir; the
    readers below refuse a dir whose files are not the ones listed (a mix of two runs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tpas.errors import TpasError
from tpas.io import check_manifest, read_parquet

CANDIDATE_COLUMNS = ["query_index", "rank", "image", "itc", "itm", "score"]
QUERY_COLUMNS = ["query_index", "position", "caption", "gt_image"]
CANDIDATES_FILE = "candidates.parquet"
QUERIES_FILE = "queries.parquet"


def candidates_frame(query_index: list[str], image: list[str], itc: np.ndarray, itm: np.ndarray,
                     score: np.ndarray, rank: np.ndarray) -> pd.DataFrame:
    """Build a candidates table with the canonical column order and dtypes."""
    return pd.DataFrame({
        "query_index": pd.Series(query_index, dtype="string"),
        "rank": np.asarray(rank, dtype=np.int32),
        "image": pd.Series(image, dtype="string"),
        "itc": np.asarray(itc, dtype=np.float32),
        "itm": np.asarray(itm, dtype=np.float32),
        "score": np.asarray(score, dtype=np.float32),
    })


def queries_frame(query_index: list[str], caption: list[str], gt_image: list[str | None] | None = None) -> pd.DataFrame:
    n = len(query_index)
    return pd.DataFrame({
        "query_index": pd.Series(query_index, dtype="string"),
        "position": np.arange(n, dtype=np.int32),
        "caption": pd.Series(caption, dtype="string"),
        "gt_image": pd.Series(gt_image if gt_image is not None else [None] * n, dtype="string"),
    })


def read_candidates(stage_dir: str | Path) -> pd.DataFrame:
    check_manifest(stage_dir)  # the files of a stage dir must be the ones its stage wrote together
    path = Path(stage_dir) / CANDIDATES_FILE
    frame = read_parquet(path, CANDIDATE_COLUMNS, hint="run `python infer.py` first (or point --input-dir at its output)")
    if frame.empty:
        raise TpasError(f"{path}: has no rows; re-run the stage that wrote it.")
    return frame


def read_queries(stage_dir: str | Path) -> pd.DataFrame:
    check_manifest(stage_dir)
    path = Path(stage_dir) / QUERIES_FILE
    frame = read_parquet(path, QUERY_COLUMNS, hint="run `python infer.py` first (or point --input-dir at its output)")
    return frame.sort_values("position", kind="stable").reset_index(drop=True)


def ground_truth(queries: pd.DataFrame) -> dict[str, str] | None:
    """query_index → true image, or None when the queries carry no ground truth."""
    known = queries.dropna(subset=["gt_image"])
    if known.empty:
        return None
    return dict(zip(known["query_index"].astype(str), known["gt_image"].astype(str)))
