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
READ_HINT = "run `python infer.py` first (or point --input-dir at its output)"


def candidates_frame(
    query_index: list[str], image: list[str], itc: np.ndarray, itm: np.ndarray, score: np.ndarray, rank: np.ndarray
) -> pd.DataFrame:
    """Build a candidates table with the canonical column order and dtypes."""
    return pd.DataFrame(
        {
            "query_index": pd.Series(query_index, dtype="string"),
            "rank": np.asarray(rank, dtype=np.int32),
            "image": pd.Series(image, dtype="string"),
            "itc": np.asarray(itc, dtype=np.float32),
            "itm": np.asarray(itm, dtype=np.float32),
            "score": np.asarray(score, dtype=np.float32),
        }
    )


def queries_frame(query_index: list[str], caption: list[str], gt_image: list[str | None] | None = None) -> pd.DataFrame:
    n = len(query_index)
    return pd.DataFrame(
        {
            "query_index": pd.Series(query_index, dtype="string"),
            "position": np.arange(n, dtype=np.int32),
            "caption": pd.Series(caption, dtype="string"),
            "gt_image": pd.Series(gt_image if gt_image is not None else [None] * n, dtype="string"),
        }
    )


def check_candidates(frame: pd.DataFrame, path: str | Path) -> None:
    """Refuse a candidates table that no stage may pass on: a null query or image, a score that is not
    finite, a (query, image) pair listed twice, or ranks that do not run 1..k within a query.

    itc and itm may be NaN (itm is NaN when not re-ranked; an answer file read back has no itc).
    Vectorised over codes, so millions of rows (an ensemble's inputs) take well under a second.
    """
    fix = "re-run the stage that wrote it"
    q, queries = pd.factorize(frame["query_index"])  # codes in order of first appearance
    img, images = pd.factorize(frame["image"])
    if (q < 0).any() or (img < 0).any():
        column = "query_index" if (q < 0).any() else "image"
        row = int(np.flatnonzero((q < 0) | (img < 0))[0])
        raise TpasError(f"{path}: row {row} has no {column}; {fix}.")
    score = frame["score"].to_numpy(dtype=np.float64, na_value=np.nan)
    rank = frame["rank"].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(~np.isfinite(score))
    if len(bad):
        i = int(bad[0])
        raise TpasError(
            f"{path}: query {queries[q[i]]} has score {score[i]} at rank {rank[i]:g}; "
            f"every candidate needs a finite score: {fix}."
        )
    repeated = pd.Series(q.astype(np.int64) * len(images) + img).duplicated().to_numpy()
    if repeated.any():
        i = int(np.flatnonzero(repeated)[0])
        raise TpasError(f"{path}: query {queries[q[i]]} lists image {images[img[i]]} more than once; {fix}.")
    # Rows as infer.py writes them (by query, then rank) need no sort.
    in_order = bool((np.diff(q) >= 0).all()) and bool((np.diff(rank)[np.diff(q) == 0] > 0).all())
    order = np.arange(len(q)) if in_order else np.lexsort((rank, q))
    count = np.bincount(q)
    position = np.arange(len(q)) - (np.cumsum(count) - count)[q[order]]
    wrong = rank[order] != position + 1
    if wrong.any():
        code = int(q[order][wrong].min())  # the query that appears first in the file
        ranks = np.sort(rank[q == code])
        shown = ", ".join(f"{r:g}" for r in ranks[:6]) + (", ..." if len(ranks) > 6 else "")
        raise TpasError(
            f"{path}: query {queries[code]} has ranks {shown}; ranks must run 1..k, each once, within a query: {fix}."
        )


def read_candidates(stage_dir: str | Path, categorical: bool = False, hint: str = READ_HINT) -> pd.DataFrame:
    """A stage dir's candidates.parquet, checked by `check_candidates` (`hint`: the fix for a missing file).

    `categorical`: only CANDIDATE_COLUMNS are read, query_index and image as pandas categoricals
    decoded from the parquet dictionaries: several times faster and smaller than str objects at
    an ensemble's millions of rows.
    """
    check_manifest(stage_dir)  # the files of a stage dir must be the ones its stage wrote together
    path = Path(stage_dir) / CANDIDATES_FILE
    frame = _read_categorical(path, hint) if categorical else read_parquet(path, CANDIDATE_COLUMNS, hint=hint)
    if frame.empty:
        raise TpasError(f"{path}: has no rows; re-run the stage that wrote it.")
    check_candidates(frame, path)
    if categorical:
        for col in ("query_index", "image"):
            if not isinstance(frame[col].dtype, pd.CategoricalDtype):  # a column written without a dictionary
                frame[col] = pd.Categorical(frame[col].astype(str))
    return frame


def _read_categorical(path: Path, hint: str) -> pd.DataFrame:
    """`tpas.io.read_parquet`'s checks and messages, reading through pyarrow with dictionary columns."""
    import pyarrow as pa  # only this reader needs pyarrow's own API
    import pyarrow.parquet as pq

    if not path.is_file():
        raise TpasError(f"{path}: file not found; {hint}.")
    try:
        missing = [c for c in CANDIDATE_COLUMNS if c not in pq.read_schema(path).names]
        if not missing:
            return pq.read_table(path, columns=CANDIDATE_COLUMNS, read_dictionary=["query_index", "image"]).to_pandas()
    except (pa.ArrowException, OSError, ValueError) as exc:  # what pyarrow raises for a corrupt file
        raise TpasError(f"{path}: not a readable parquet file ({exc}); regenerate it.") from None
    raise TpasError(f"{path}: missing column(s) {', '.join(missing)}; regenerate it with this version of tpas.")


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
