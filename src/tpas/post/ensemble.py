"""Fuse the candidates of several retrieval stage dirs into one stage dir (score-level ensemble).

Each input is a stage dir (see tpas.schema) written by infer.py (or sca.py) for the same query
set, e.g. by different fine-tuned runs. Per model and per query, the chosen score column is
normalised (z-score, min-max, reciprocal rank or none); the candidates of a query are the union
over models, and a pair's fused score is the weighted sum of its normalised scores. The output
has the same schema as its inputs, so sca.py and submit.py run on it unchanged:

    python -m tpas.post.ensemble --input-dir outputs/a --input-dir outputs/b --weight 0.6 --weight 0.4

Rules, all vectorised over (model, query, candidate) rows (no per-query Python loop):
- A (query, image) pair missing from a model's top-k gets that model's minimum normalised score
  for that query: the model ranked the image below its k-th candidate, so its true score is at
  most the k-th one; the minimum is the highest value it can have and never outranks anything
  the model did retrieve. A NaN in the fused column counts as missing too.
- Weights are scaled to sum to 1; a model of weight 0 is read, checked and scored in
  metrics.json but adds no candidates and no score.
- `itc` / `itm` of an output row are the weighted means over the models that have that pair with
  a non-NaN value (NaN if none). They are informational: different models' similarities are on
  different scales, so only `score` (the fused one) orders the list.
- Ranks are renumbered 1..k by the fused score as written (float32); ties keep the order of first
  appearance (the first input's order, then the next input's).
- Inputs must share one query set; an input that lists a (query, image) pair twice is refused.
"""
# tpas.cli.field returns a dataclasses.field (it only adds the --help text), so RUF009 does not apply.
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tpas.cli import config_command, field
from tpas.errors import TpasError
from tpas.io import staged_dir, write_bytes, write_json, write_parquet
from tpas.metrics import rank_metrics
from tpas.schema import (
    CANDIDATES_FILE,
    QUERIES_FILE,
    candidates_frame,
    ground_truth,
    read_candidates,
    read_queries,
)

NORMALIZE_CHOICES = ["zscore", "minmax", "rank", "none"]
COLUMN_CHOICES = ["score", "itm", "itc"]
CONFIG_FILE = "ensemble_config.json"
ENSEMBLE_OUTPUTS = (CANDIDATES_FILE, QUERIES_FILE, CONFIG_FILE, "metrics.json")


@dataclass
class EnsembleConfig:
    input_dir: list[Path] = field(
        [],
        help="Stage dir to fuse (candidates.parquet + queries.parquet, e.g. an "
        "infer.py output); repeat the flag once per model.",
    )
    weight: list[float] = field(
        [],
        help="Weight of each --input-dir, in the same order (default: equal); scaled "
        "to sum to 1; weight 0 leaves a model out of the fusion.",
    )
    output_dir: Path = field(Path("outputs/ensemble"), help="Where to write the fused stage dir.")
    normalize: str = field(
        "zscore",
        help="Per model and query, how scores are made comparable: z-score, min-max "
        "to [0, 1], reciprocal rank 1/(rrf_k + rank), or raw scores.",
        choices=NORMALIZE_CHOICES,
    )
    rrf_k: float = field(60.0, help="Constant of --normalize rank (reciprocal rank fusion); larger flattens the top.")
    column: str = field("score", help="Which candidates column to fuse.", choices=COLUMN_CHOICES)
    k: int | None = field(None, help="Candidates kept per query (default: the largest k among the inputs).")


@dataclass
class ModelRows:
    """One input's candidates as flat arrays (compact dtypes: 100k queries x 128 is 12.8 M rows)."""

    q: np.ndarray  # int: query position (index into the shared query order)
    image: np.ndarray  # int: code into the shared image names
    value: np.ndarray  # float: the fused column (NaN = missing)
    rank: np.ndarray  # int: the input's own rank (tie-break and metrics)
    itc: np.ndarray  # float
    itm: np.ndarray  # float


class RepeatedPairError(TpasError):
    """An input lists one (query, image) pair twice; run_ensemble turns it into a message with names."""

    def __init__(self, model: int, query: int, image: int) -> None:
        super().__init__(f"input {model}: query position {query} lists image code {image} more than once")
        self.model, self.query, self.image = model, query, image


def _codes(column: pd.Series, index: pd.Index) -> np.ndarray:
    """Codes of a categorical column in `index` (-1 where absent)."""
    cat = column.cat
    lookup = np.append(index.get_indexer(cat.categories.astype(str)), -1).astype(np.int32)  # code -1 (null) → -1
    return lookup[cat.codes.to_numpy()]


def _names(index: pd.Index, codes: np.ndarray) -> pd.Series:
    """index[codes] as a "string" Series, built in Arrow (millions of rows; no Python str objects)."""
    names = pa.array(index.to_numpy(dtype=object), type=pa.string())
    return pd.Series(
        pd.arrays.ArrowStringArray(pa.DictionaryArray.from_arrays(codes.astype(np.int32), names).dictionary_decode()),
        dtype="string",
    )


def _sorted_order(q: np.ndarray, value: np.ndarray, rank: np.ndarray) -> np.ndarray | None:
    """Row order by query, then value descending, then the input's rank; None if already in that order."""
    dq = np.diff(q)
    if (dq >= 0).all():
        within, dv = dq == 0, np.diff(value)
        if not (within & (dv > 0)).any():
            ties = np.flatnonzero(within & (dv == 0))
            if (rank[ties + 1] > rank[ties]).all():
                return None  # as infer.py writes it: skip the sort
    return np.lexsort((rank, -value, q))


def _dense(m: ModelRows, n_queries: int, pad_image: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One model's rows as [Q, width] arrays, each query's row sorted by value descending.

    Returns the per-query row counts and image / value / itc / itm arrays padded with
    `pad_image` / NaN; rows whose value is NaN are dropped. An infer.py output (k rows per
    query, already sorted) is only reshaped.
    """
    cols = {"image": m.image, "value": m.value, "itc": m.itc, "itm": m.itm}
    q, rank = m.q, m.rank
    keep = ~np.isnan(m.value)
    if not keep.all():
        q, rank, cols = q[keep], rank[keep], {name: v[keep] for name, v in cols.items()}
    order = _sorted_order(q, cols["value"], rank)
    if order is not None:
        q, cols = q[order], {name: v[order] for name, v in cols.items()}
    count = np.bincount(q, minlength=n_queries)
    width = int(count.max(initial=0))
    if len(q) == n_queries * width:  # sorted and every query has `width` rows
        return count, {name: v.reshape(n_queries, width) for name, v in cols.items()}
    position = np.arange(len(q)) - (np.cumsum(count) - count)[q]
    dense = {}
    for name, v in cols.items():
        dense[name] = np.full((n_queries, width), pad_image if name == "image" else np.nan, dtype=v.dtype)
        dense[name][q, position] = v
    return count, dense


def normalise(value: np.ndarray, count: np.ndarray, method: str, rrf_k: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Normalise each query's scores; returns (normalised [Q, W], per-query minimum = fill for missing pairs).

    `value` is [Q, W]: row q holds its query's first count[q] scores sorted descending, then
    padding (NaN in the result). zscore: (v - mean) / std (population std; 0 where all scores are
    equal); minmax: (v - min) / (max - min) (0 where max = min); rank: 1 / (rrf_k + position),
    position 1, 2, ... (ties get consecutive ranks); none: v. A query with no scores has fill NaN.
    Works in place on one float64 copy: at 100k queries x 128 each temporary is 100 MB.
    """
    if method not in NORMALIZE_CHOICES:
        raise TpasError(f"--normalize {method}: unknown; use one of {', '.join(NORMALIZE_CHOICES)}.")
    out = np.array(value, dtype=np.float64)
    count = np.asarray(count)
    n_queries, width = out.shape
    rows, last = np.arange(n_queries), np.maximum(count - 1, 0)
    padding = np.arange(width)[None, :] >= count[:, None] if count.min(initial=width) < width else None
    # Rows are sorted descending, so the first score is the maximum and the last the minimum (exactly).
    flat = (count == 0) | (out[:, 0] == out[rows, last])
    if method == "zscore":
        if padding is not None:
            out[padding] = 0.0
        safe = np.maximum(count, 1)[:, None]
        out -= out.sum(axis=1, keepdims=True) / safe
        if padding is not None:
            out[padding] = 0.0
        std = np.sqrt(np.einsum("ij,ij->i", out, out)[:, None] / safe)
        np.divide(out, std, out=out, where=~flat[:, None])
        out[flat] = 0.0
    elif method == "minmax":
        lo = out[rows, last][:, None]
        span = out[:, :1] - lo
        out -= lo
        np.divide(out, span, out=out, where=~flat[:, None])
        out[flat] = 0.0
    elif method == "rank":
        out[:] = 1.0 / (rrf_k + np.arange(1, width + 1))
    if padding is not None:
        out[padding] = np.nan
    # Every method is monotone, so the last score of a row is its minimum.
    fill = np.where(count > 0, out[rows, last], np.nan)
    return out, fill


def _descending_key(score: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the float32 scores' descending order."""
    bits = (-score.astype(np.float32) + np.float32(0.0)).view(np.uint32)  # + 0 turns -0.0 into 0.0
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def _check_repeats(image: np.ndarray, pad: int, model: int) -> None:
    """Raise RepeatedPairError if a row lists an image twice (it would skew that model's statistics and sum)."""
    ordered = np.sort(image, axis=1)
    repeat = ordered[:, 1:] == ordered[:, :-1]
    repeat &= ordered[:, 1:] != pad
    if repeat.any():
        row, col = np.argwhere(repeat)[0]
        raise RepeatedPairError(model, int(row), int(ordered[row, col]))


def fuse(
    models: list[ModelRows],
    weights: list[float],
    n_queries: int,
    normalize: str = "zscore",
    rrf_k: float = 60.0,
    k: int | None = None,
) -> dict[str, np.ndarray]:
    """Fuse models (weights ≥ 0, summing to 1) → arrays q, image, rank, itc, itm, score sorted by (q, rank).

    Works on [Q, W] arrays, W = the inputs' widths side by side (columns: input, then its rank),
    so every step is a numpy operation over all queries at once; big temporaries are reused,
    since allocating them dominates the time at 100k queries. Raises RepeatedPairError if an
    input lists one (query, image) pair twice.
    """
    pad = 1 + max(int(m.image.max(initial=-1)) for m in models)  # an image code above every real one
    base = np.zeros(n_queries)
    parts: dict[str, list[np.ndarray]] = {"image": [], "contrib": [], "itc": [], "itm": [], "weight": []}
    for index, (m, w) in enumerate(zip(models, weights)):
        if w <= 0:
            continue
        count, dense = _dense(m, n_queries, pad)
        _check_repeats(dense["image"], pad, index)
        contrib, fill = normalise(dense["value"], count, normalize, rrf_k)
        # A pair's score: every model's fill (as if missing everywhere), plus each model's gain over its fill.
        base += w * np.nan_to_num(fill)
        contrib -= fill[:, None]
        contrib *= w
        for name, part in (
            ("image", dense["image"]),
            ("contrib", contrib),
            ("itc", dense["itc"]),
            ("itm", dense["itm"]),
            ("weight", np.full(contrib.shape[1], w)),
        ):
            parts[name].append(part)
    width = sum(part.shape[1] for part in parts["image"])
    col_weight = np.concatenate(parts.pop("weight"))

    # Sort each query's row by (image, column): a pair's entries become adjacent, the earliest column first.
    shift = max(width - 1, 1).bit_length()  # bits that hold a column number
    key = np.concatenate(parts.pop("image"), axis=1).astype(np.int64, copy=False)
    key <<= shift
    key |= np.arange(width)
    key.sort(axis=1)
    col_s = key & ((1 << shift) - 1)
    key >>= shift
    image_s = key
    real = image_s < pad
    start = np.empty_like(real)  # first entry of each (query, image) pair
    start[:, 0] = True
    np.not_equal(image_s[:, 1:], image_s[:, :-1], out=start[:, 1:])
    start &= real
    starts = np.flatnonzero(start)  # row-major: by query, then image
    n_pairs = len(starts)
    q_pair, first_col, image_pair = starts // width, col_s.ravel()[starts], image_s.ravel()[starts]
    del image_s, key
    # Pair number of every entry; a pair's entries are contiguous, padding joins the pair before it (adding 0).
    pair_of = np.cumsum(start.ravel(), dtype=np.int64)
    del start
    pair_of -= 1
    np.maximum(pair_of, 0, out=pair_of)

    # Gather each entry's values in sorted order through one flat index and two reused buffers.
    weight_s = col_weight[col_s]
    flat_index = col_s
    flat_index += (np.arange(n_queries) * width)[:, None]
    buffer = np.empty(n_queries * width)
    np.take(
        np.concatenate(parts.pop("contrib"), axis=1).ravel(),
        flat_index,
        out=buffer.reshape(flat_index.shape),
        mode="clip",
    )
    buffer[~real.ravel()] = 0.0  # padding (NaN)
    score = base[q_pair] + np.bincount(pair_of, weights=buffer, minlength=n_pairs)
    del real
    buffer32 = np.empty(flat_index.shape, dtype=np.float32)
    missing = np.empty(flat_index.shape, dtype=bool)
    means = {}
    for name in ("itc", "itm"):
        np.take(np.concatenate(parts.pop(name), axis=1).ravel(), flat_index, out=buffer32, mode="clip")
        np.isnan(buffer32, out=missing)  # padding is NaN too
        np.multiply(buffer32, weight_s, out=buffer.reshape(flat_index.shape))
        buffer[missing.ravel()] = 0.0
        num = np.bincount(pair_of, weights=buffer, minlength=n_pairs)
        np.copyto(buffer.reshape(flat_index.shape), weight_s)
        buffer[missing.ravel()] = 0.0
        den = np.bincount(pair_of, weights=buffer, minlength=n_pairs)
        means[name] = np.divide(num, den, out=np.full(n_pairs, np.nan), where=den > 0)
    del weight_s, flat_index, buffer, buffer32, missing, pair_of

    # Rank by the float32 score that is written (so the file is exactly sorted by it); ties: earliest column.
    # One uint64 key per pair at [query, first column]: score key in the high half, column in the low half.
    empty = np.iinfo(np.uint64).max
    rank_key = np.full((n_queries, width), empty, dtype=np.uint64)
    score_key = _descending_key(score).astype(np.uint64) << np.uint64(32)
    rank_key[q_pair, first_col] = score_key | first_col.astype(np.uint64)
    slot = np.full((n_queries, width), -1, dtype=np.int64)
    slot[q_pair, first_col] = np.arange(n_pairs)
    rank_key.sort(axis=1)
    top = rank_key[:, : (width if k is None else min(k, width))]
    found = top != empty
    rows = np.broadcast_to(np.arange(n_queries)[:, None], top.shape)[found]
    pair = slot[rows, (top[found] & np.uint64(0xFFFFFFFF)).astype(np.int64)]
    new_rank = np.broadcast_to(np.arange(1, top.shape[1] + 1), top.shape)[found]
    return {
        "q": rows,
        "image": image_pair[pair],
        "rank": new_rank,
        "itc": means["itc"][pair],
        "itm": means["itm"][pair],
        "score": score[pair],
    }


def _resolve_weights(cfg: EnsembleConfig) -> list[float]:
    n = len(cfg.input_dir)
    if not cfg.weight:
        return [1.0 / n] * n
    if len(cfg.weight) != n:
        raise TpasError(
            f"got {len(cfg.weight)} --weight value(s) for {n} --input-dir(s); pass one --weight per "
            "--input-dir, in the same order, or none for equal weights."
        )
    w = np.asarray(cfg.weight, dtype=float)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise TpasError(
            f"--weight {' '.join(f'{x:g}' for x in cfg.weight)}: weights must be finite and ≥ 0; "
            "pass a non-negative weight per --input-dir."
        )
    if w.sum() == 0:
        raise TpasError("every --weight is 0; give at least one --input-dir a positive weight.")
    return (w / w.sum()).tolist()


def _load_inputs(cfg: EnsembleConfig) -> tuple[pd.DataFrame, list[ModelRows], pd.Index]:
    """Read and check every input; codes share one query order (the first input's) and one image index."""
    dirs = [Path(d) for d in cfg.input_dir]
    queries = read_queries(dirs[0])
    order = pd.Index(queries["query_index"].astype(str))
    if order.has_duplicates:
        raise TpasError(
            f"{dirs[0] / QUERIES_FILE}: query id {order[order.duplicated()][0]} appears more than once; "
            "re-run the stage that wrote it."
        )
    frames = []
    for d in dirs:
        if d != dirs[0]:
            other = set(read_queries(d)["query_index"].astype(str))
            differ = sorted(other.symmetric_difference(order))
            if differ:
                raise TpasError(
                    f"{d / QUERIES_FILE}: its query set differs from {dirs[0] / QUERIES_FILE} "
                    f"({len(differ)} id(s) differ, e.g. {differ[0]}); run every input on the same queries."
                )
        # categoricals: fast and small for millions of rows; the checks are every stage reader's
        frames.append(
            read_candidates(
                d, categorical=True, hint=f"run `python infer.py --output-dir {d}` first or fix the --input-dir"
            )
        )
    images = pd.Index(pd.unique(np.concatenate([f["image"].cat.categories.astype(str).to_numpy() for f in frames])))
    models = []
    for d, frame in zip(dirs, frames):
        path = d / CANDIDATES_FILE
        q = _codes(frame["query_index"], order)
        if (q < 0).any():
            bad = frame["query_index"].astype(str).to_numpy()[np.flatnonzero(q < 0)[0]]
            raise TpasError(f"{path}: query id {bad} is not in {d / QUERIES_FILE}; re-run the stage that wrote {d}.")
        value = frame[cfg.column].to_numpy(dtype=np.float32, na_value=np.nan)
        valid = ~np.isnan(value)
        if not valid.any():
            raise TpasError(
                f"{path}: column {cfg.column} is NaN everywhere (e.g. infer.py --no-itm leaves itm NaN); "
                "pick another --column or re-run that input."
            )
        empty = np.flatnonzero(np.bincount(q[valid], minlength=len(order)) == 0)
        if len(empty):
            raise TpasError(
                f"{path}: query {order[empty[0]]} ({len(empty)} in all) has no candidates with a "
                f"{cfg.column} value; re-run that input on every query."
            )
        models.append(
            ModelRows(
                q=q,
                image=_codes(frame["image"], images),
                value=value,
                rank=frame["rank"].to_numpy(dtype=np.int32),
                itc=frame["itc"].to_numpy(dtype=np.float32, na_value=np.nan),
                itm=frame["itm"].to_numpy(dtype=np.float32, na_value=np.nan),
            )
        )
    return queries, models, images


def _metrics(
    q: np.ndarray, image: np.ndarray, rank: np.ndarray, gt_code: np.ndarray, scored: np.ndarray
) -> dict[str, float]:
    """`tpas.metrics` of these rows over the `scored` query positions (ground truth order), found through codes."""
    true_rank = np.full(len(gt_code), np.inf)
    hit = image == gt_code[q]
    true_rank[q[hit]] = rank[hit]
    return rank_metrics(true_rank[scored])


def run_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """Fuse cfg.input_dir into cfg.output_dir (candidates, queries, config, metrics); returns the summary."""
    started = time.time()
    if not cfg.input_dir:
        raise TpasError("no --input-dir given; pass --input-dir once per stage dir to fuse.")
    if cfg.k is not None and cfg.k < 10:
        raise TpasError(f"--k {cfg.k} is below 10, the length of an answer line; use --k 10 or more.")
    weights = _resolve_weights(cfg)
    queries, models, images = _load_inputs(cfg)
    order = pd.Index(queries["query_index"].astype(str))
    n_queries = len(order)
    k = cfg.k if cfg.k is not None else max(int(np.bincount(m.q).max()) for m in models)
    try:
        fused = fuse(models, weights, n_queries, cfg.normalize, cfg.rrf_k, k)
    except RepeatedPairError as exc:
        raise TpasError(
            f"{Path(cfg.input_dir[exc.model]) / CANDIDATES_FILE}: query {order[exc.query]} lists image "
            f"{images[exc.image]} more than once; drop the repeated rows or re-run the stage that "
            "wrote it."
        ) from None

    out = Path(cfg.output_dir)
    candidates = candidates_frame(
        _names(order, fused["q"]),
        _names(images, fused["image"]),
        fused["itc"],
        fused["itm"],
        fused["score"],
        fused["rank"],
    )
    resolved = dataclasses.replace(cfg, weight=weights, k=k)

    per_query = np.bincount(fused["q"], minlength=n_queries)
    summary: dict[str, Any] = {
        "inputs": [str(d) for d in cfg.input_dir],
        "weights": weights,
        "queries": n_queries,
        "k": k,
        "rows": len(candidates),
        "min_candidates": int(per_query.min()),
    }
    line = (
        f"ensemble: {len(models)} input{'s' if len(models) > 1 else ''} ({cfg.normalize} of {cfg.column}; weights "
        f"{', '.join(f'{w:.2f}' for w in weights)}) → {n_queries} queries × ≤{k} candidates → {out}"
    )
    gt = ground_truth(queries)
    if gt is not None:
        # Per query position, the code of its true image; -2 (never an image code) where unknown.
        gt_code = np.full(n_queries, -2, dtype=np.int64)
        true_image = images.get_indexer(list(gt.values()))
        scored = order.get_indexer(list(gt))
        gt_code[scored] = np.where(true_image >= 0, true_image, -2)
        per_input = [
            {"dir": str(d), "weight": w, **_metrics(m.q, m.image, m.rank, gt_code, scored)}
            for d, w, m in zip(cfg.input_dir, weights, models)
        ]
        fused_metrics = _metrics(fused["q"], fused["image"], fused["rank"], gt_code, scored)
        summary["metrics"] = {"inputs": per_input, "ensemble": fused_metrics}
        for name in ("R@1", "mAP"):
            inputs = " / ".join(f"{m[name]:.2f}" for m in per_input)
            line += f"{';' if name == 'R@1' else ','} {name} {inputs} → {fused_metrics[name]:.2f}"
    with staged_dir(out, ENSEMBLE_OUTPUTS, "ensemble") as part:  # the whole stage dir at once
        write_parquet(part / CANDIDATES_FILE, candidates)
        write_bytes(part / QUERIES_FILE, (Path(cfg.input_dir[0]) / QUERIES_FILE).read_bytes())
        write_json(part / CONFIG_FILE, resolved)
        if "metrics" in summary:
            write_json(part / "metrics.json", summary["metrics"])
    summary["seconds"] = round(time.time() - started, 1)
    print(line + f" ({summary['seconds']:.1f}s)")
    return summary


@config_command(
    EnsembleConfig,
    help="Fuse the candidates of several stage dirs (infer.py outputs on the same queries) "
    "into one stage dir with the same schema, for sca.py and submit.py.",
)
def main(cfg: EnsembleConfig) -> None:
    run_ensemble(cfg)


if __name__ == "__main__":
    main()
