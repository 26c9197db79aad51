"""A candidates table as [Q, K] arrays (`Lists`), and what every post-processing method shares.

Queries are rows in answer order (`position`), each row its list in rank order; images are codes
into `Lists.names`. No Q×Q or Q×G matrix is ever formed. Also here: the change-log table the
methods write (`change_log`), per-row permutations (`sort_by`, `move_to_front`) and the ground
truth as image codes (`gt_codes_for`, the input of `tpas.metrics.array_metrics`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tpas.schema import ground_truth

CHANGE_COLUMNS = ["query_index", "old_image", "new_image", "old_score", "new_score", "delta", "round", "group"]


@dataclass
class Lists:
    """A candidates table as [Q, K] arrays in answer order; padding: image -1, score NaN, row -1."""

    order: np.ndarray  # [Q] query ids (object)
    img: np.ndarray  # [Q, K] image codes into `names`
    score: np.ndarray  # [Q, K] float64
    row: np.ndarray  # [Q, K] row of `source`
    names: np.ndarray  # [G'] image names (object)
    source: pd.DataFrame

    def copy(self) -> Lists:
        return dataclasses.replace(self, img=self.img.copy(), score=self.score.copy(), row=self.row.copy())

    def permute(self, perm: np.ndarray, new_score: np.ndarray | None = None) -> None:
        """Reorder each row by `perm` (new slot → old slot); scores move along unless `new_score` is given."""
        self.img = np.take_along_axis(self.img, perm, axis=1)
        self.row = np.take_along_axis(self.row, perm, axis=1)
        self.score = np.take_along_axis(self.score, perm, axis=1) if new_score is None else new_score


def answer_order(queries: pd.DataFrame) -> pd.DataFrame:
    """The queries table sorted by `position` (as it is when it has none)."""
    return queries.sort_values("position", kind="stable") if "position" in queries.columns else queries


def query_order(queries: pd.DataFrame) -> list[str]:
    """Query ids in answer order (`position`)."""
    return answer_order(queries)["query_index"].astype(str).tolist()


def query_captions(queries: pd.DataFrame) -> list[str]:
    """Captions in answer order (`position`); a missing caption is ''."""
    return answer_order(queries)["caption"].fillna("").astype(str).tolist()


def to_lists(candidates: pd.DataFrame, order: list[str]) -> Lists:
    """Arrays from a candidates table (any row order); raises ValueError for a query not in `order`."""
    qcodes, quniq = pd.factorize(candidates["query_index"])
    pos_of = pd.Index(order).get_indexer(pd.Index(quniq).astype(str))
    if (pos_of < 0).any():
        raise ValueError(
            f"candidates hold query {quniq[np.flatnonzero(pos_of < 0)[0]]!r}, which is absent from the queries"
        )
    q = pos_of[qcodes].astype(np.int64)
    rank = candidates["rank"].to_numpy(dtype=np.int64)
    key = q * (int(rank.max(initial=0)) + 2) + rank
    sort = np.arange(len(key)) if np.all(key[1:] >= key[:-1]) else np.argsort(key, kind="stable")
    q = q[sort]
    counts = np.bincount(q, minlength=len(order))
    col = np.arange(len(q)) - np.repeat(np.cumsum(counts) - counts, counts)
    width = max(int(counts.max(initial=0)), 1)
    icodes, inames = pd.factorize(candidates["image"])
    img = np.full((len(order), width), -1, dtype=np.int64)
    score = np.full((len(order), width), np.nan)
    row = np.full((len(order), width), -1, dtype=np.int64)
    img[q, col] = icodes[sort]
    score[q, col] = candidates["score"].to_numpy(dtype=float, na_value=np.nan)[sort]
    row[q, col] = sort
    return Lists(
        np.asarray(order, dtype=object),
        img,
        score,
        row,
        np.asarray(pd.Index(inames).astype(str), dtype=object),
        candidates,
    )


def from_lists(lists: Lists) -> pd.DataFrame:
    """The candidates table of `lists`: rows in answer order then new rank, rank 1..n, `score` as held."""
    valid = lists.row >= 0
    slot = np.nonzero(valid)[1]
    out = lists.source.iloc[lists.row[valid]].reset_index(drop=True)
    out["rank"] = (slot + 1).astype(out["rank"].dtype)
    out["score"] = lists.score[valid].astype(out["score"].dtype)
    return out


def sort_by(new_score: np.ndarray, img: np.ndarray) -> np.ndarray:
    """Per-row permutation sorting by new_score descending; ties and NaN keep order, padding stays last."""
    # NaN scores and padding both sort as +inf; the stable sort keeps padding, which is last, last.
    key = np.where(img >= 0, np.nan_to_num(-new_score, nan=np.inf), np.inf)
    return np.argsort(key, axis=1, kind="stable")


def move_to_front(p: np.ndarray, width: int) -> np.ndarray:
    """Per-row permutation [x0..x(p-1), xp, ...] → [xp, x0, ..., x(p-1), ...]: the given-up x0 becomes rank 2."""
    j = np.arange(width)[None, :]
    return np.where(j == 0, p[:, None], np.where(j <= p[:, None], j - 1, j))


def gt_codes_for(lists: Lists, queries: pd.DataFrame) -> np.ndarray | None:
    """Per query (answer order): code of its true image, -1 when it is in no list, -2 without ground truth."""
    gt = ground_truth(queries)
    if gt is None:
        return None
    true = pd.Series(lists.order).map(gt)
    out = np.full(len(lists.order), -2, dtype=np.int64)
    has = true.notna().to_numpy()
    out[has] = pd.Index(lists.names).get_indexer(true[has].astype(str))
    return out


def change_log(log: dict[str, np.ndarray], query_order: list[str] | np.ndarray, img_names: np.ndarray) -> pd.DataFrame:
    """The change-log table (CHANGE_COLUMNS) from a move log of codes (`sca_permutation`'s form)."""
    qpos = np.asarray(log["q"], dtype=np.int64)
    names = np.asarray(img_names, dtype=object)
    old, new = np.asarray(log["old_score"], dtype=float), np.asarray(log["new_score"], dtype=float)
    return pd.DataFrame(
        {
            "query_index": pd.Series(np.asarray(query_order, dtype=object)[qpos], dtype="string"),
            "old_image": pd.Series(names[np.asarray(log["old_image"], dtype=np.int64)], dtype="string"),
            "new_image": pd.Series(names[np.asarray(log["new_image"], dtype=np.int64)], dtype="string"),
            "old_score": old,
            "new_score": new,
            "delta": new - old,
            "round": np.asarray(log["round"]).astype(np.int32),
            "group": np.asarray(log["group"]).astype(np.int64),
        }
    )
