"""`python -m tpas.experiments.results`: regenerate docs/results.md (the seed paper's tables) and its pictures.

Stages, each written under --output-dir/<stage>/ with a stage.json (its resolved config and the
wall time it took) and skipped when that file says the same config already ran:

1. data: the demo set (--data-root, built when it is the default and empty) and a validation
   set with ground truth, disjoint from the test set: a second demo set rendered with another
   seed (--val-root, --val-seed), whose challenge folder is used for tuning post-processing.
2. train: the main run (<runs-dir>/<main-name>, the README pipeline's `runs/demo`) and the
   subset sweep at equal compute (<runs-dir>/sweep/steps<S>-subset-<n>). A run directory with a
   train_summary.json and the same settings is reused as is; a missing one is trained.
3. infer: zero-shot and fine-tuned on the test set, the fine-tuned model on held-out wording,
   each sweep run (top --sweep-k only), and both models on the validation set.
4. tune / post: each post-processing method (tpas.post) with default parameters and
   with parameters tuned on the validation set, on the zero-shot, fine-tuned and held-out lists.
5. doc: docs/results.md, docs/results/table3.png, figure2.png and figure2.html; always rewritten
   (cheap), every number read from the stage files above.

Configs are compared without cosmetic fields (progress, threads, paths of outputs, batch sizes),
and a field absent from an older saved config counts as its default, so runs trained before a
flag existed are still found.
"""

# ruff: noqa: RUF009  (tpas.cli.field() defaults carry the --help text, as in every config)
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from tpas import models as model_lib
from tpas import scores as scores_lib
from tpas.cli import config_command, field
from tpas.data import ensure_data
from tpas.demo import COMPLETE_MARKER, build_demo, demo_is_complete
from tpas.errors import TpasError
from tpas.experiments import figures
from tpas.io import json_default, read_json, write_json, write_parquet, write_text
from tpas.metrics import ranking_metrics
from tpas.retrieval import InferConfig, infer
from tpas.schema import ground_truth, read_candidates, read_queries
from tpas.train import TrainConfig, train
from tpas.train.checkpoint import find_checkpoint
from tpas.train.config import MODEL_FLAGS, model_config_for

STAGE_FILE = "stage.json"
# Fields that change where or how fast something runs, never what it computes.
COSMETIC = frozenset(
    {
        "progress",
        "threads",
        "workers",
        "output_dir",
        "cache_dir",
        "image_batch",
        "text_batch",
        "itm_batch",
        "resume",
        "save_every",
        "runs_dir",
        "name",
        "max_steps",
        "device",
        "image_cache",
        "compile",
        "grad_checkpointing",
        "fast_itm",
    }
)
DEFAULT_METHODS = ["sca", "assign", "dual-softmax", "inverted-softmax", "rerank", "dual-softmax,sca"]
METRIC_KEYS = ("R@1", "R@5", "R@10", "mAP", "mINP")
BUSY_SECONDS = 600  # an unfinished run written more recently than this is taken to be training elsewhere


@dataclass
class ResultsConfig:
    data_root: Path = field(
        Path("data/demo"),
        "Demo set; its challenge folder (with query_gt.json) is the test set. Built when it is the default and empty.",
    )
    val_root: Path = field(
        Path("data/demo-val"),
        "Validation set for tuning post-processing: a second demo set rendered here with --val-seed (disjoint from the test set).",
    )
    val_seed: int = field(1, "Seed of the validation demo set (must differ from the test set's seed 0).")
    val_queries: int = field(1000, "Queries in the validation set (its gallery holds half as many distractors again).")
    runs_dir: Path = field(
        Path("runs"),
        "Runs: the main run is <runs-dir>/<main-name>, the sweep runs <runs-dir>/sweep/steps<S>-subset-<n>.",
    )
    main_name: str = field("demo", "Name of the main fine-tuned run (the README pipeline's runs/demo).")
    main_subset: int = field(10000, "Training pairs of the main run (0 = all).")
    main_epochs: int = field(TrainConfig().epochs, "Epochs of the main run (train.py's default).")
    model: str = field("lite", "Model preset of every run and of the zero-shot model.", choices=list(model_lib.PRESETS))
    batch_size: int = field(TrainConfig().batch_size, "Pairs per training step (train.py's default).")
    val_size: int = field(500, "Training pairs held out for each run's validation (history.json).")
    k: int = field(128, "Candidates per query re-ranked by ITM for the main run (and kept for post-processing).")
    sweep_sizes: list[int] = field(
        [1000, 2000, 5000, 10000, 0], "Table 3 subset sizes (0 = all training pairs); repeat the flag per size."
    )
    sweep_steps: int = field(300, "Training steps of every sweep run (equal compute across subset sizes).")
    sweep_k: int = field(32, "Candidates re-ranked by ITM for the sweep runs (smaller than --k to bound CPU time).")
    methods: list[str] = field(
        list(DEFAULT_METHODS),
        "Post-processing methods for Table 4; a comma joins methods applied in order (dual-softmax,sca). Repeat the flag.",
    )
    tune: bool = field(
        True, "Also tune each method's parameters on the validation set and apply them to the test lists."
    )
    output_dir: Path = field(Path("outputs/results"), "Stage outputs (one folder per stage, each with its stage.json).")
    cache_dir: Path = field(Path("outputs/cache"), "Gallery feature cache shared with infer.py.")
    doc: Path = field(Path("docs/results.md"), "The Markdown report; its pictures go to <doc's folder>/results/.")
    figure_queries: int = field(
        8, "Queries shown in Figure 2: about half changed by the best method (before/after), the rest ordinary."
    )
    seed: int = field(0, "Seed of every run, of the zero-shot heads and of the figure's choice of ordinary queries.")
    threads: int = field(0, "Torch CPU threads (0 = all cores).")
    progress: bool = field(True, "Show progress bars.")


# ---------------------------------------------------------------- stage cache


def _plain(obj: Any) -> Any:
    """JSON-normal form (as write_json would store it): dataclasses → dicts, Paths → str, tuples → lists."""
    return json.loads(json.dumps(obj, default=json_default))


def config_key(config: Any) -> dict:
    """A config as a plain dict without its cosmetic fields."""
    return {k: v for k, v in _plain(config).items() if k not in COSMETIC}


def config_differences(saved: Any, want: Any, prefix: str = "") -> list[str]:
    """Keys whose values differ; a key missing on either side is not a difference (older/newer versions)."""
    if isinstance(saved, dict) and isinstance(want, dict):
        out: list[str] = []
        for key in saved.keys() & want.keys():
            if key not in COSMETIC:
                out += config_differences(saved[key], want[key], f"{prefix}{key}.")
        return out
    return [] if saved == want else [prefix.rstrip(".") or "value"]


@dataclass
class StageRecord:
    name: str
    what: str
    seconds: float | None
    cached: bool
    finished: str | None


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


class Stages:
    """Runs stages, skipping those whose stage.json holds the same key; collects their wall times."""

    def __init__(self, progress: bool):
        self.progress = progress
        self.records: list[StageRecord] = []

    def run(
        self, name: str, what: str, folder: Path, key: Any, fn: Callable[[], Any], required: list[str]
    ) -> StageRecord:
        stage_file = folder / STAGE_FILE
        key = _plain(key)
        if stage_file.is_file() and all((folder / r).exists() for r in required):
            saved = read_json(stage_file)
            if not config_differences(saved.get("key"), key) and saved.get("key") is not None:
                record = StageRecord(name, what, saved.get("seconds"), True, saved.get("finished"))
                self.records.append(record)
                print(f"[results] {name}: up to date ({_fmt_seconds(record.seconds)} when it ran), skipped")
                return record
        print(f"[results] {name}: {what} ...")
        started = time.perf_counter()
        fn()
        seconds = round(time.perf_counter() - started, 1)
        record = StageRecord(name, what, seconds, False, _now())
        write_json(
            stage_file, {"stage": name, "what": what, "key": key, "seconds": seconds, "finished": record.finished}
        )
        self.records.append(record)
        print(f"[results] {name}: done in {_fmt_seconds(seconds)}")
        return record


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds:,.0f} s ({seconds / 60:.1f} min)"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process (weights are ~100 MB)."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def _data_marker(root: Path) -> dict | None:
    """The demo set's build parameters (its .complete marker), or None for other data."""
    marker = Path(root) / COMPLETE_MARKER
    if not marker.is_file():
        return None
    return {k: v for k, v in read_json(marker).items() if k not in ("out_dir", "seconds", "reused")}


# ---------------------------------------------------------------- stages


def _stage_data(cfg: ResultsConfig, stages: Stages) -> None:
    folder = cfg.output_dir / "data"

    def build() -> None:
        ensure_data(cfg.data_root, cfg.seed)
        test = _data_marker(cfg.data_root)
        if test is not None and test.get("seed") == cfg.val_seed:
            raise TpasError(
                f"{cfg.val_root}: --val-seed {cfg.val_seed} is the seed of the test set {cfg.data_root}; "
                f"pick another so that the validation set is independent."
            )
        build_demo(
            cfg.val_root,
            seed=cfg.val_seed,
            n_train=2,
            n_test=cfg.val_queries,
            workers=max(1, min(2, os.cpu_count() or 1)),
            progress=cfg.progress,
        )

    have_test = demo_is_complete(cfg.data_root) or (Path(cfg.data_root) / "challenge").is_dir()
    if not (have_test and demo_is_complete(cfg.val_root)):
        (folder / STAGE_FILE).unlink(missing_ok=True)  # the data went missing since the stage ran: build again
    key = {
        "data_root": str(cfg.data_root),
        "val_root": str(cfg.val_root),
        "val_seed": cfg.val_seed,
        "val_queries": cfg.val_queries,
    }
    stages.run(
        "data",
        f"test set {cfg.data_root} (built if absent) + validation set {cfg.val_root} "
        f"(seed {cfg.val_seed}, {cfg.val_queries:,} queries)",
        folder,
        key,
        build,
        [],
    )


def _train_config(
    cfg: ResultsConfig, name: str, subset: int, runs_dir: Path, epochs: int | None = None, steps: int | None = None
) -> TrainConfig:
    kwargs: dict[str, Any] = {
        "data_root": cfg.data_root,
        "subset": subset,
        "val_size": cfg.val_size,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "model": cfg.model,
        "runs_dir": runs_dir,
        "name": name,
        "threads": cfg.threads,
        "progress": cfg.progress,
    }
    if epochs is not None:
        kwargs["epochs"] = epochs
    if steps is not None:
        kwargs["steps"] = steps
    return TrainConfig(**kwargs)


def _newest_mtime(run_dir: Path) -> float:
    newest = 0.0
    for path in [run_dir, *run_dir.iterdir(), *(run_dir / "checkpoint").glob("*")]:
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:  # swapped away by a checkpoint save in progress
            pass
    return newest


def _stage_train(stages: Stages, tcfg: TrainConfig, what: str) -> dict:
    """Reuse a finished run with the same settings, resume an interrupted one, or train it."""
    run_dir = Path(tcfg.runs_dir) / tcfg.name
    # the model flags are compared as what they resolved to (a flag left to the preset is None)
    # a step budget's epochs are derived from it (config.json records the resolved count);
    # look-alike batches left to their default resolve against the run's pairs (config.json records them)
    derived = MODEL_FLAGS + (("epochs",) if tcfg.steps else ())
    derived += tuple(k for k in ("batch_clusters", "cluster_group") if getattr(tcfg, k) is None)
    want = {k: v for k, v in config_key(tcfg).items() if k not in derived}
    model_cfg = model_config_for(tcfg)
    # a warm-up left to its default is recorded as what it resolved to for this model
    want["tower_warmup"] = tcfg.resolved_tower_warmup(model_cfg)
    want_model = _plain(dataclasses.asdict(model_cfg))
    stage = f"train/{tcfg.name}"
    if (run_dir / "config.json").is_file():
        saved_config = read_json(run_dir / "config.json")
        saved = {k: v for k, v in saved_config.get("train", {}).items() if k not in derived}
        differ = config_differences(saved, want) + [
            f"model.{k}" for k in config_differences(saved_config.get("model", {}), want_model)
        ]
        if differ:
            raise TpasError(
                f"{run_dir}: holds a run trained with other settings ({', '.join(sorted(differ))}); "
                f"delete or rename it, or pass another --runs-dir."
            )
    summary_file = run_dir / "train_summary.json"
    if summary_file.is_file() and (run_dir / "model.safetensors").is_file():
        summary = read_json(summary_file)
        finished = dt.datetime.fromtimestamp(summary_file.stat().st_mtime).astimezone().isoformat(timespec="seconds")
        stages.records.append(StageRecord(stage, what, summary.get("seconds"), True, finished))
        print(f"[results] {stage}: trained already ({_fmt_seconds(summary.get('seconds'))}), reused")
        return summary
    resume = (run_dir / "config.json").is_file()
    if resume:
        age = time.time() - _newest_mtime(run_dir)
        if age < BUSY_SECONDS:  # another process is most likely training it: resuming now would corrupt it
            raise TpasError(
                f"{run_dir}: unfinished and written {age:.0f} s ago, so it is probably being trained right "
                f"now; wait until its train_summary.json appears (or delete the folder), then re-run."
            )
    if resume and find_checkpoint(run_dir) is None:
        raise TpasError(f"{run_dir}: an unfinished run without a checkpoint; delete it so it can be trained again.")
    print(f"[results] {stage}: {'resuming' if resume else 'training'} {what} ...")
    started = time.perf_counter()
    summary = train(dataclasses.replace(tcfg, resume=resume))
    seconds = round(time.perf_counter() - started, 1)
    stages.records.append(StageRecord(stage, what, summary.get("seconds", seconds), False, _now()))
    return summary


def _stage_infer(cfg: ResultsConfig, stages: Stages, name: str, what: str, **kwargs: Any) -> dict:
    """One infer() call into --output-dir/<name>; returns its stage key (for downstream stages)."""
    icfg = InferConfig(
        output_dir=cfg.output_dir / name,
        cache_dir=cfg.cache_dir,
        seed=cfg.seed,
        threads=cfg.threads,
        progress=cfg.progress,
        **kwargs,
    )
    weights = None if icfg.zero_shot else Path(icfg.run) / "model.safetensors"
    key = {
        "infer": config_key(icfg),
        "data": _data_marker(Path(icfg.data_root)),
        "weights": _file_digest(weights) if weights is not None else None,
    }
    stages.run(
        name,
        what,
        icfg.output_dir,
        key,
        lambda: infer(icfg),
        ["candidates.parquet", "queries.parquet", "gallery.parquet", "metrics.json"],
    )
    return key


# ---------------------------------------------------------------- post-processing


def _postprocess() -> Any:
    try:
        from tpas.post import methods as postprocess
    except ImportError as exc:
        raise TpasError(f"cannot import tpas.post ({exc}); Table 4 needs it: update the package.") from None
    return postprocess


class CaptionEmbedder:
    """Sentence embeddings of a stage's captions, computed once (the MiniLM encoder is loaded lazily)."""

    def __init__(self) -> None:
        self._encoder: Any = None
        self._memo: dict[str, np.ndarray] = {}

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from tpas.post.sca import load_sentence_encoder

            self._encoder = load_sentence_encoder()
        return self._encoder

    def __call__(self, stage_dir: Path, captions: list[str]) -> np.ndarray:
        key = str(stage_dir)
        if key not in self._memo:
            from tpas.post.sca import embed_captions

            self._memo[key] = embed_captions(captions, self.encoder)
        return self._memo[key]


def _slug(method: str) -> str:
    return method.replace(",", "+")


def _methods(method: str) -> list[str]:
    return [m.strip() for m in method.split(",") if m.strip()]


def _top1(candidates: pd.DataFrame) -> pd.Series:
    ordered = candidates.sort_values(["query_index", "rank"], kind="stable")
    first = ordered.groupby("query_index", sort=False).head(1)
    return pd.Series(first["image"].astype(str).to_numpy(), index=first["query_index"].astype(str).to_numpy())


def top1_changes(before: pd.DataFrame, after: pd.DataFrame, gt: dict[str, str]) -> dict[str, Any]:
    """Queries whose top-1 changed, how many of them became right (fixed) or wrong (broken), and
    McNemar's exact two-sided p-value for fixed vs broken (None when nothing changed at top-1)."""
    a, b = _top1(before), _top1(after).reindex(_top1(before).index)
    truth = pd.Series(gt).reindex(a.index)
    changed = a != b
    fixed = int((changed & (b == truth) & (a != truth)).sum())
    broken = int((changed & (a == truth) & (b != truth)).sum())
    p = float(binomtest(fixed, fixed + broken, 0.5).pvalue) if fixed + broken else None
    return {
        "top1_changed": int(changed.sum()),
        "fixed": fixed,
        "broken": broken,
        "p_value": p,
        "changed_queries": a.index[changed].tolist(),
    }


def _top10(candidates: pd.DataFrame) -> pd.DataFrame:
    return candidates[candidates["rank"] <= 10].reset_index(drop=True)


def _params(post: Any, values: dict | None) -> Any:
    """A PostprocessConfig from saved values (None: the defaults); unknown keys are ignored."""
    if values is None:
        return post.PostprocessConfig()
    names = {f.name for f in dataclasses.fields(post.PostprocessConfig)}
    return post.PostprocessConfig(**{k: v for k, v in values.items() if k in names})


def _apply(
    post: Any,
    candidates: pd.DataFrame,
    queries: pd.DataFrame,
    method: str,
    params: Any,
    emb: np.ndarray,
    embed: CaptionEmbedder,
) -> pd.DataFrame:
    new, _log = post.apply_methods(candidates, queries, _methods(method), params, encoder=embed.encoder, embeddings=emb)
    return new


def _labelled_stage(
    folder: Path, embed: CaptionEmbedder, need: str
) -> tuple[pd.DataFrame, pd.DataFrame, dict, np.ndarray]:
    """A stage dir's candidates, queries, ground truth (required: `need` says why) and caption embeddings."""
    candidates, queries = read_candidates(folder), read_queries(folder)
    gt = ground_truth(queries)
    if gt is None:
        raise TpasError(f"{folder / 'queries.parquet'}: no ground truth; {need}.")
    return candidates, queries, gt, embed(folder, queries["caption"].astype(str).tolist())


def _stage_tune(
    cfg: ResultsConfig, stages: Stages, name: str, val_stage: str, val_key: dict, embed: CaptionEmbedder
) -> dict:
    """Tune every method on a validation stage; tuned.json holds the parameters and the validation
    metrics of each method with default and with tuned parameters (used to pick the best method
    without looking at the test set)."""
    folder = cfg.output_dir / name
    val_dir = cfg.output_dir / val_stage

    def run() -> None:
        post = _postprocess()
        candidates, queries, gt, emb = _labelled_stage(val_dir, embed, "the validation set needs query_gt.json")
        params, validation, reports = {}, {}, {}
        for method in cfg.methods:
            best, report = post.tune(
                candidates, queries, _methods(method), post.PostprocessConfig(), encoder=embed.encoder, embeddings=emb
            )
            params[method] = _plain(best)
            reports[method] = _plain(report)
            validation[method] = {
                variant: ranking_metrics(_apply(post, candidates, queries, method, p, emb, embed), gt)
                for variant, p in (("default", post.PostprocessConfig()), ("tuned", best))
            }
        write_json(
            folder / "tuned.json",
            {
                "validation_stage": str(val_dir),
                "baseline": ranking_metrics(candidates, gt),
                "params": params,
                "validation": validation,
                "reports": reports,
            },
        )

    key = {"methods": cfg.methods, "val": val_key}
    stages.run(name, f"tune {len(cfg.methods)} method(s) on {val_stage}", folder, key, run, ["tuned.json"])
    return key


def _stage_post(
    cfg: ResultsConfig,
    stages: Stages,
    source: str,
    test_stage: str,
    test_key: dict,
    tune_stage: str | None,
    tune_key: dict | None,
    embed: CaptionEmbedder,
) -> None:
    """Every method on one candidate list, with default and tuned parameters; writes post.json."""
    folder = cfg.output_dir / f"post-{source}"
    test_dir = cfg.output_dir / test_stage

    def run() -> None:
        post = _postprocess()
        candidates, queries, gt, emb = _labelled_stage(test_dir, embed, "Table 4 needs a test set with query_gt.json")
        tuned = read_json(cfg.output_dir / tune_stage / "tuned.json")["params"] if tune_stage else {}
        rows = [
            {
                "method": "none",
                "variant": "-",
                "params": None,
                **ranking_metrics(candidates, gt),
                "top1_changed": 0,
                "fixed": 0,
                "broken": 0,
                "p_value": None,
                "seconds": 0.0,
            }
        ]
        for method in cfg.methods:
            variants: list[tuple[str, dict | None]] = [("default", None)]
            if method in tuned:
                variants.append(("tuned", tuned[method]))
            for variant, values in variants:
                params = _params(post, values)
                started = time.perf_counter()
                new = _apply(post, candidates, queries, method, params, emb, embed)
                seconds = round(time.perf_counter() - started, 2)
                changes = top1_changes(candidates, new, gt)
                write_parquet(folder / f"{_slug(method)}-{variant}.parquet", _top10(new))
                rows.append(
                    {
                        "method": method,
                        "variant": variant,
                        "params": _plain(params),
                        **ranking_metrics(new, gt),
                        **{k: v for k, v in changes.items() if k != "changed_queries"},
                        "seconds": seconds,
                    }
                )
        write_json(folder / "post.json", {"source": test_stage, "tuned_by": tune_stage, "rows": rows})

    key = {"methods": cfg.methods, "test": test_key, "tune": tune_key}
    stages.run(f"post-{source}", f"{len(cfg.methods)} method(s) on {test_stage}", folder, key, run, ["post.json"])


# ---------------------------------------------------------------- the report


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _std_err(r1: float, n: int) -> float:
    """Binomial standard error of an R@1 (in points) over n queries."""
    p = r1 / 100
    return 100 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def _size_label(n: int, pairs: int | None) -> str:
    if n == 0:
        return f"all ({pairs:,})" if pairs else "all"
    return f"{n / 1000:g}k" if n >= 1000 and n % 100 == 0 else str(n)


def _machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        gpu = "GPU: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        torch_version = torch.__version__
    except (ImportError, RuntimeError, AssertionError):  # the report must not fail over a machine description
        gpu, torch_version = "GPU unknown", "?"
    return f"{cores} CPU cores ({cpu}), {gpu}; Python {platform.python_version()}, torch {torch_version}"


def _metric_cells(m: dict, keys: tuple[str, ...] = METRIC_KEYS) -> list[str]:
    return [_f(m.get(k)) for k in keys]


def _rel(link: Path, doc: Path) -> str:
    return os.path.relpath(link, doc.parent).replace(os.sep, "/")


@dataclass
class _Context:
    cfg: ResultsConfig
    pictures: Path  # folder of the doc's pictures
    post: dict[str, dict]  # source → post.json
    tuned: dict[str, dict]  # tune stage → params per method


def _section_table2(cfg: ResultsConfig, out: Path) -> tuple[str, dict]:
    zero = read_json(out / "zero-shot" / "metrics.json")
    main = read_json(out / "finetuned" / "metrics.json")
    gt = ground_truth(read_queries(out / "finetuned"))
    if gt is None:
        raise TpasError(
            f"{cfg.data_root}: its test queries have no ground truth (query_gt.json); the results page "
            f"needs a test set with known answers, such as the demo set."
        )
    itm = main.get("by_score", {}).get("log-odds")
    gallery = len(pd.read_parquet(out / "finetuned" / "gallery.parquet"))
    n = int(main["final"]["queries"])
    chance = {"R@1": 100 / gallery, "R@5": 500 / gallery, "R@10": 1000 / gallery}
    rows = [
        ["chance (random ranking)", _f(chance["R@1"]), _f(chance["R@5"]), _f(chance["R@10"]), "–", "–"],
        ["zero-shot, ITC", *_metric_cells(zero["itc"])],
        [f"fine-tuned ({cfg.main_name}), ITC only", *_metric_cells(main["itc"])],
    ]
    if itm is not None:
        rows.append([f"fine-tuned, ITC top-{cfg.k} re-ranked by ITM alone (log-odds)", *_metric_cells(itm)])
    rows.append(
        [
            f"fine-tuned, ITC top-{cfg.k} re-ranked by `--score {main.get('score', 'tpas')}` (default)",
            *_metric_cells(main["final"]),
        ]
    )
    z, f_itc, f_final = zero["itc"]["R@1"], main["itc"]["R@1"], main["final"]["R@1"]
    se = _std_err(f_final, n)
    verb = "raises" if f_final > z else "lowers" if f_final < z else "leaves"
    text = [
        (
            f"Fine-tuning {verb} R@1 from {_f(z)} (zero-shot) to {_f(f_final)} ({f_final - z:+.2f} points; chance is "
            f"{_f(chance['R@1'])}). Adding the ITM logit to the ITC logit "
            f"{'gains' if f_final >= f_itc else 'loses'} {abs(f_final - f_itc):.2f} points of R@1 over ITC alone"
        )
    ]
    if itm is not None:
        text[-1] += (
            f"; re-ranking by ITM alone {'gains' if itm['R@1'] >= f_itc else 'loses'} {abs(itm['R@1'] - f_itc):.2f}"
        )
    text[-1] += "."
    if z < 3 * chance["R@1"]:
        text.append(
            "The zero-shot row is within a few times chance: the preset's image-text heads (ITC projections, "
            "ITM head, cross-attention) start untrained, as no image-text checkpoint is available offline."
        )
    text.append(f"With {n:,} queries the binomial standard error of an R@1 near {_f(f_final)} is {se:.2f} points.")
    body = (
        f"## Table 2: zero-shot vs fine-tuned\n\nDemo test set: {n:,} queries × {gallery:,} gallery images "
        f"(challenge folder of `{cfg.data_root}`; R@k, mAP, mINP in %; one true image per query, so mAP = mINP; "
        f"mAP/mINP are over the top-{cfg.k} list, a lower bound).\n\n"
        + _table(["model / scoring", "R@1", "R@5", "R@10", "mAP", "mINP"], rows)
        + "\n\n**What this shows.** "
        + " ".join(text)
        + "\n"
    )
    return body, {"zero": zero, "main": main, "n": n, "gallery": gallery}


def _sweep_name(steps: int, n: int) -> str:
    return f"steps{steps}-subset-{n}"


def _section_table3(cfg: ResultsConfig, out: Path, pictures: Path) -> str:
    rows, points = [], []
    for n in cfg.sweep_sizes:
        name = _sweep_name(cfg.sweep_steps, n)
        run = cfg.runs_dir / "sweep" / name
        summary = read_json(run / "train_summary.json")
        history = read_json(run / "history.json") if (run / "history.json").is_file() else []
        val = history[-1]["val_itc"] if history and history[-1].get("val_itc") else {}
        metrics = read_json(out / f"sweep-{name}" / "metrics.json")["final"]
        pairs = int(summary["train_pairs"])
        passes = summary["steps"] * cfg.batch_size / max(pairs, 1)
        rows.append(
            [
                _size_label(n, pairs),
                f"{pairs:,}",
                str(summary["steps"]),
                _f(passes),
                _f(val.get("R@1")),
                *_metric_cells(metrics, ("R@1", "R@5", "R@10", "mAP")),
                _fmt_seconds(summary.get("seconds")),
            ]
        )
        points.append((pairs, metrics["R@1"], val.get("R@1"), n))
    points.sort()
    sizes = [p[0] for p in points]
    series = {f"test R@1 (ITM+ITC, top-{cfg.sweep_k})": [p[1] for p in points]}
    if all(p[2] is not None for p in points):
        series["validation R@1 (ITC, history.json)"] = [p[2] for p in points]
    plot = pictures / "table3.png"
    figures.plot_subset_sweep(plot, sizes, series, f"R@1 vs training subset size, {cfg.sweep_steps} steps each")
    test_r1 = [p[1] for p in points]
    best = max(points, key=lambda p: p[1])
    monotonic = all(b >= a for a, b in itertools.pairwise(test_r1))
    n_queries = int(
        read_json(out / f"sweep-{_sweep_name(cfg.sweep_steps, cfg.sweep_sizes[0])}" / "metrics.json")["final"][
            "queries"
        ]
    )
    text = (
        f"At {cfg.sweep_steps} steps of {cfg.batch_size} pairs each, test R@1 goes from {_f(points[0][1])} "
        f"({points[0][0]:,} pairs) to {_f(points[-1][1])} ({points[-1][0]:,} pairs); the best is "
        f"{_f(best[1])} with {best[0]:,} pairs. Test R@1 {'does not decrease' if monotonic else 'is not monotonic'} "
        f"as the subset grows; the standard error of each R@1 is about "
        f"{_std_err(float(np.mean(test_r1)), n_queries):.2f} points, so smaller differences are noise."
    )
    if len(points) >= 2:
        spread, se = max(test_r1) - min(test_r1), _std_err(float(np.mean(test_r1)), n_queries)
        text += f" The spread across subset sizes is {spread:.2f} points, " + (
            "within two standard errors: at equal compute these subset sizes are not distinguishable here."
            if spread < 2 * se
            else "more than two standard errors."
        )
    k_note = f", smaller than the main run's {cfg.k} to bound CPU time" if cfg.sweep_k < cfg.k else ""
    return (
        f"## Table 3: training-subset size at equal compute\n\nEach run: `TrainConfig(subset=n, steps="
        f"{cfg.sweep_steps})` (same seed, same validation pairs), so every run sees "
        f"{cfg.sweep_steps * cfg.batch_size:,} pairs whatever n. Test metrics: ITC top-{cfg.sweep_k} re-ranked "
        f"by ITM + ITC (`--sweep-k {cfg.sweep_k}`{k_note}; R@1/5/10 are exact for any k ≥ 10). Validation R@1: "
        f"ITC on the run's held-out pairs (history.json, last epoch).\n\n"
        + _table(
            [
                "subset",
                "train pairs",
                "steps",
                "passes over subset",
                "val R@1",
                "test R@1",
                "R@5",
                "R@10",
                "mAP",
                "train time",
            ],
            rows,
        )
        + f"\n\n![R@1 vs subset size]({_rel(plot, cfg.doc)})\n\n**What this shows.** {text}\n"
    )


SOURCES = [("zero-shot", "zero-shot"), ("finetuned", "fine-tuned"), ("heldout", "held-out wording")]


def _method_fields(method: str) -> list[str] | None:
    """PostprocessConfig fields a method reads, from their help text ("sca, assign: ..."); None if unknown."""
    try:
        post = _postprocess()
    except TpasError:
        return None
    names = set(_methods(method))
    out = [
        f.name
        for f in dataclasses.fields(post.PostprocessConfig)
        if names & {x.strip() for x in str(f.metadata.get("help", "")).split(":", 1)[0].split(",")}
    ]
    return out or None


def _params_text(method: str, params: dict | None) -> str:
    if params is None:
        return "defaults"
    keep = _method_fields(method) or sorted(params)
    defaults = _plain(_postprocess().PostprocessConfig())

    def show(name: str) -> str:
        value = params[name]
        text = f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
        return f"**{text}**" if defaults.get(name) != value else text  # bold: differs from the default

    return ", ".join(show(k) for k in keep if k in params)


def _row(post: dict, method: str, variant: str) -> dict | None:
    return next((r for r in post["rows"] if r["method"] == method and r["variant"] == variant), None)


def choose_method(tuned: dict[str, dict], post: dict[str, dict]) -> dict | None:
    """The post-processing to feature (held-out table, Figure 2): the best fine-tuned-validation
    R@1 among every method × {default, tuned}; without a validation run, the best test R@1."""
    val = tuned.get("tune-finetuned", {}).get("validation")
    if val:
        options = [(m, v) for m, by in val.items() for v in by]
        method, variant = max(options, key=lambda mv: (val[mv[0]][mv[1]]["R@1"], val[mv[0]][mv[1]]["mAP"]))
        base = tuned["tune-finetuned"]["baseline"]["R@1"]
        return {
            "method": method,
            "variant": variant,
            "chosen_on": f"the validation set (R@1 {base:.2f} → {val[method][variant]['R@1']:.2f} there)",
        }
    if "finetuned" in post and len(post["finetuned"]["rows"]) > 1:
        top = max(post["finetuned"]["rows"][1:], key=lambda r: r["R@1"])
        return {"method": top["method"], "variant": top["variant"], "chosen_on": "the test set (no validation run)"}
    return None


def _section_table4(cfg: ResultsConfig, post: dict[str, dict], tuned: dict[str, dict], chosen: dict | None) -> str:
    parts = [
        "## Table 4: post-processing\n",
        (
            "Each method re-orders the candidate lists of Table 2; a comma means methods applied in order. "
            "*default*: the method's default parameters; *tuned*: parameters chosen by `tpas.post.methods.tune` on "
            f"the validation set (`{cfg.val_root}`: a demo set rendered with seed {cfg.val_seed}, "
            f"{cfg.val_queries:,} queries, disjoint from the test set), then applied unchanged to the test lists. "
            "The zero-shot lists use the parameters tuned on the zero-shot model's validation lists; the fine-tuned "
            "and held-out-wording lists those tuned on the fine-tuned model's validation lists (ordinary wording). "
            "*top-1 changed*: queries whose first image changed; *fixed / broken*: of those, the ones whose first "
            "image became right / wrong; *p*: McNemar's exact two-sided test of fixed vs broken.\n"
        ),
    ]
    for source, label in SOURCES:
        if source not in post:
            continue
        rows_data = post[source]["rows"]
        base = rows_data[0]
        rows = []
        for r in rows_data:
            delta = r["R@1"] - base["R@1"]
            rows.append(
                [
                    r["method"],
                    r["variant"],
                    _f(r["R@1"]),
                    _f(r["R@5"]),
                    _f(r["R@10"]),
                    "–" if r["method"] == "none" else f"{delta:+.2f}",
                    str(r["top1_changed"]),
                    f"{r['fixed']} / {r['broken']}",
                    "–" if r["p_value"] is None else f"{r['p_value']:.3g}",
                ]
            )
        parts.append(
            f"### {label} candidates (`{post[source]['source']}`)\n\n"
            + _table(["method", "params", "R@1", "R@5", "R@10", "ΔR@1", "top-1 changed", "fixed / broken", "p"], rows)
            + "\n"
        )
        methods = rows_data[1:]
        if not methods:
            continue
        top = max(methods, key=lambda r: r["R@1"])
        helps = [
            f"{r['method']} ({r['variant']})"
            for r in methods
            if r["R@1"] > base["R@1"] and r["p_value"] is not None and r["p_value"] < 0.05
        ]
        hurts = [
            f"{r['method']} ({r['variant']})"
            for r in methods
            if r["R@1"] < base["R@1"] and r["p_value"] is not None and r["p_value"] < 0.05
        ]
        if top["R@1"] > base["R@1"]:
            sentence = (
                f"On the {label} lists the highest test R@1 is {top['method']} ({top['variant']}): "
                f"{_f(base['R@1'])} → {_f(top['R@1'])} ({top['R@1'] - base['R@1']:+.2f}; {top['fixed']} fixed, "
                f"{top['broken']} broken). "
            )
        else:
            sentence = f"On the {label} lists no method raises test R@1 above {_f(base['R@1'])}. "
        sentence += (
            f"Significant gains (p < 0.05): {', '.join(helps)}. "
            if helps
            else "No method gains significantly (p < 0.05). "
        )
        sentence += f"Significant losses: {', '.join(hurts)}." if hurts else "No method loses significantly."
        deltas = [
            r["R@1"] - d["R@1"]
            for r in methods
            if r["variant"] == "tuned"
            for d in methods
            if d["method"] == r["method"] and d["variant"] == "default"
        ]
        if deltas:
            sentence += (
                f" Tuned parameters change test R@1 by {np.mean(deltas):+.2f} points on average over the "
                f"defaults (from {min(deltas):+.2f} to {max(deltas):+.2f})."
            )
        if chosen and source == "finetuned":
            r = _row(post[source], chosen["method"], chosen["variant"])
            if r is not None:
                sentence += (
                    f" Chosen on {chosen['chosen_on']}: {chosen['method']} ({chosen['variant']}), "
                    f"{r['R@1'] - base['R@1']:+.2f} R@1 on the test lists."
                )
        parts.append(f"**What this shows.** {sentence}\n")
    if tuned:
        rows = []
        for stage, payload in tuned.items():
            base = payload["baseline"]["R@1"]
            for method, params in payload["params"].items():
                val = payload.get("validation", {}).get(method, {})
                chosen_values = (payload.get("reports", {}).get(method) or {}).get("chosen")
                text = (
                    "; ".join(
                        ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
                        for values in chosen_values.values()
                    )
                    if chosen_values
                    else _params_text(method, params)
                )
                rows.append(
                    [
                        method,
                        f"`{stage}`",
                        text,
                        _f(base),
                        _f(val.get("default", {}).get("R@1")),
                        _f(val.get("tuned", {}).get("R@1")),
                    ]
                )
        parts.append(
            "Tuned parameters (the values `tune` chose, method by method) and validation R@1 without "
            "post-processing, with default and with tuned parameters:\n\n"
            + _table(["method", "tuned on", "tuned parameters", "val R@1 none", "default", "tuned"], rows)
            + "\n"
        )
    return "\n".join(parts)


def _section_heldout(cfg: ResultsConfig, out: Path, post: dict[str, dict], chosen: dict | None) -> str:
    keys = ("R@1", "R@5", "R@10")
    zero = read_json(out / "zero-shot" / "metrics.json")["itc"]
    zero_h = read_json(out / "zero-shot-heldout" / "metrics.json")["itc"]
    main = read_json(out / "finetuned" / "metrics.json")["final"]
    main_h = read_json(out / "heldout" / "metrics.json")["final"]
    rows = [
        ["zero-shot, ITC", *[_f(zero[k]) for k in keys], *[_f(zero_h[k]) for k in keys]],
        ["fine-tuned, ITM + ITC", *[_f(main[k]) for k in keys], *[_f(main_h[k]) for k in keys]],
    ]
    gain, gain_h = main["R@1"] - zero["R@1"], main_h["R@1"] - zero_h["R@1"]
    keeps = f"{100 * main_h['R@1'] / main['R@1']:.0f}%" if main["R@1"] > 0 else "–"
    text = (
        f"Fine-tuning changes R@1 over zero-shot by {gain:+.2f} points with the training wording and by "
        f"{gain_h:+.2f} with the held-out wording"
    )
    text += (
        f": {100 * gain_h / gain:.0f}% of the gain survives new phrasing"
        if gain > 0
        else ": there is no gain on the training wording to carry over"
    )
    text += f" (the fine-tuned R@1 keeps {keeps} of its value)."
    if chosen and "finetuned" in post and "heldout" in post:
        r, r_h = (
            _row(post["finetuned"], chosen["method"], chosen["variant"]),
            _row(post["heldout"], chosen["method"], chosen["variant"]),
        )
        if r is not None and r_h is not None:
            label = f"{chosen['method']} ({chosen['variant']})"
            rows.append([f"fine-tuned + {label}", *[_f(r[k]) for k in keys], *[_f(r_h[k]) for k in keys]])
            d, d_h = r["R@1"] - main["R@1"], r_h["R@1"] - main_h["R@1"]
            text += (
                f" Post-processing with {label}, chosen on {chosen['chosen_on']}, changes R@1 by {d:+.2f} with "
                f"the training wording and {d_h:+.2f} with the held-out wording "
                f"({r_h['fixed']} queries fixed, {r_h['broken']} broken"
                + (f", p = {r_h['p_value']:.3g}" if r_h["p_value"] is not None else "")
                + ")."
            )
    return (
        "## Held-out wording\n\nThe same test images and ground truth, queried with `query_heldout.json`: "
        "captions written by a second, independent template set that training never saw.\n\n"
        + _table(["model", "R@1", "R@5", "R@10", "held-out R@1", "held-out R@5", "held-out R@10"], rows)
        + f"\n\n**What this shows.** {text}\n"
    )


def _figure_panels(
    cfg: ResultsConfig, out: Path, chosen: dict | None
) -> tuple[list[figures.QueryPanel], list[str], str]:
    """Panels of Figure 2, the kind of each (fixed, broken, ...) and the post-processing shown."""
    stage = out / "finetuned"
    before = read_candidates(stage)
    queries = read_queries(stage)
    gt = ground_truth(queries) or {}
    captions = dict(zip(queries["query_index"].astype(str), queries["caption"].astype(str)))
    top10 = {
        str(q): g["image"].astype(str).tolist()
        for q, g in _top10(before).sort_values(["query_index", "rank"]).groupby("query_index", sort=False)
    }
    panels: list[figures.QueryPanel] = []
    kinds: list[str] = []
    changed: list[str] = []
    label = "no post-processing"
    if chosen is not None:
        label = f"{chosen['method']} ({chosen['variant']})"
        after_frame = pd.read_parquet(out / "post-finetuned" / f"{_slug(chosen['method'])}-{chosen['variant']}.parquet")
        after = {
            str(q): g["image"].astype(str).tolist()
            for q, g in after_frame.sort_values(["query_index", "rank"]).groupby("query_index", sort=False)
        }
        moved = top1_changes(before, after_frame, gt)["changed_queries"]
        fixed = [q for q in moved if after[q][0] == gt.get(q)]
        broken = [q for q in moved if top10[q][0] == gt.get(q)]
        other = [q for q in moved if q not in fixed and q not in broken]
        want = max(1, cfg.figure_queries // 2)
        # Mostly what the method fixed, one it broke (if any), then other moves.
        order = fixed[: max(1, want - 1)] + broken[:1] + fixed[max(1, want - 1) :] + other
        for q in order[:want]:
            kind = "fixed" if q in fixed else "broken" if q in broken else "changed, still wrong"
            note = {"fixed": f"fixed by {label}", "broken": f"broken by {label}"}.get(
                kind, f"changed by {label}, still wrong"
            )
            changed.append(q)
            kinds.append(kind)
            panels.append(
                figures.QueryPanel(
                    q,
                    captions[q],
                    gt.get(q),
                    note,
                    [figures.RankedRow("before", top10[q]), figures.RankedRow("after", after[q])],
                )
            )
    rng = np.random.default_rng(cfg.seed)
    pool = [q for q in queries["query_index"].astype(str) if q not in set(changed)]
    for q in rng.permutation(pool)[: max(0, cfg.figure_queries - len(panels))].tolist():
        hit = top10[q][0] == gt.get(q)
        kinds.append("ordinary, " + ("right at rank 1" if hit else "wrong at rank 1"))
        panels.append(
            figures.QueryPanel(
                q,
                captions[q],
                gt.get(q),
                "ordinary, " + ("right at rank 1" if hit else "wrong at rank 1"),
                [figures.RankedRow("top-10", top10[q])],
            )
        )
    return panels, kinds, label


def _figure_method(post: dict[str, dict], chosen: dict | None) -> dict | None:
    """The chosen method; if it changed no top-1 on the fine-tuned test lists, the one that changed most."""
    rows = post.get("finetuned", {}).get("rows", [])[1:]
    picked = _row(post["finetuned"], chosen["method"], chosen["variant"]) if chosen and rows else None
    if picked is not None and picked["top1_changed"] > 0:
        return chosen
    most = max(rows, key=lambda r: r["top1_changed"], default=None)
    if most is None or most["top1_changed"] == 0:
        return chosen
    return {"method": most["method"], "variant": most["variant"]}


def _section_figure(cfg: ResultsConfig, out: Path, pictures: Path, post: dict[str, dict], chosen: dict | None) -> str:
    shown = _figure_method(post, chosen)
    panels, kinds, label = _figure_panels(cfg, out, shown)
    gallery = pd.read_parquet(out / "finetuned" / "gallery.parquet")
    paths = dict(zip(gallery["image"].astype(str), gallery["path"].astype(str)))
    title = f"Fine-tuned model: top-10 gallery images per query, true image framed green; post-processing: {label}"
    figures.ranked_lists_png(pictures / "figure2.png", panels, paths, title)
    figures.ranked_lists_html(
        pictures / "figure2.html",
        panels,
        paths,
        title,
        intro="Each row is one ranked list, best first; the true image has a green frame. "
        "Queries whose top-1 the post-processing changed show the list before and after.",
    )
    counts = pd.Series(kinds).value_counts().to_dict()
    n_changed = sum(len(p.rows) == 2 for p in panels)
    why = (
        ""
        if shown == chosen
        else " (the method chosen for the held-out table changed no top-1 here, so the "
        "figure shows the one that changed most)"
    )
    return (
        f"## Figure 2: ranked lists\n\nFor {len(panels)} test queries: the caption and the fine-tuned model's "
        f"top-10 gallery images (true image framed green). {n_changed} are queries whose top-1 {label} "
        f"changed{why}, shown before and after; the others are ordinary queries drawn at random (seed {cfg.seed}). "
        f"Kinds: "
        + "; ".join(f"{v} × {k}" for k, v in counts.items())
        + f". The same panels as a page: [figure2.html]({_rel(pictures / 'figure2.html', cfg.doc)}).\n\n"
        f"![Figure 2]({_rel(pictures / 'figure2.png', cfg.doc)})\n"
    )


def _section_timing(records: list[StageRecord], wall: float) -> str:
    rows = [
        [
            f"`{r.name}`",
            r.what,
            _fmt_seconds(r.seconds),
            f"cached (ran {r.finished[:10]})" if r.cached and r.finished else "ran now" if not r.cached else "cached",
        ]
        for r in records
    ]
    total = sum(r.seconds or 0.0 for r in records)
    return (
        "## Wall time of each stage\n\n"
        + _table(["stage", "what", "wall time", "this invocation"], rows)
        + f"\n\nTotal compute behind this page: {_fmt_seconds(total)} (the sum of the stage times, a cached stage "
        f"counting the time it took when it ran). This invocation took {_fmt_seconds(wall)}.\n"
    )


SCORE_RULE_SOURCES = {
    "xvlm": "X-VLM `Retrieval.py` `evaluation`",
    "cmp": "CMP `CMP_Baseline_Code/eval.py`",
    "blip": "BLIP `train_retrieval.py` `evaluation`",
    "log-odds": "the head's log-odds",
    "tpas": "tpas (ITM log-odds + ITC logit)",
    "itc": "ITC alone",
}


def _section_score_rules(cfg: ResultsConfig, out: Path) -> str:
    """The same candidates ranked under every score rule (infer's metrics.json by_score), val and test."""
    val = read_json(out / "finetuned-val" / "metrics.json")
    test = read_json(out / "finetuned" / "metrics.json")
    if "by_score" not in val or "by_score" not in test:
        return ""
    default = test.get("score")
    best_val = max(val["by_score"], key=lambda rule: val["by_score"][rule]["R@1"])
    rows = []
    for rule in scores_lib.SCORE_RULES:
        if rule not in test["by_score"]:
            continue
        t, v = test["by_score"][rule], val["by_score"][rule]
        name = f"`{rule}`" + (" (default)" if rule == default else "")
        rows.append(
            [
                name,
                scores_lib.FORMULAS[rule],
                SCORE_RULE_SOURCES[rule],
                _f(v["R@1"]),
                _f(t["R@1"]),
                _f(t["R@5"]),
                _f(t["R@10"]),
            ]
        )
    n_val, n_test = int(val["final"]["queries"]), int(test["final"]["queries"])
    verdict = (
        "the default is the rule with the best validation R@1"
        if best_val == default
        else f"`{best_val}` has the best validation R@1, not the default `{default}`"
    )
    return (
        f"## Score rules\n\nThe fine-tuned run's ITC top-{cfg.k} ranked by each `infer.py --score` rule "
        f"(`tpas.scores`; l1/l0 = the ITM head's match/no-match logit, ITC = cosine similarity); validation: "
        f"`{cfg.val_root}` ({n_val:,} queries), test: {n_test:,} queries. Every row ranks the same candidates, "
        f"so R@{cfg.k} is the same for all.\n\n"
        + _table(["rule", "score", "reference", "val R@1", "test R@1", "test R@5", "test R@10"], rows)
        + f"\n\n**What this shows.** On validation, {verdict}. The standard error of an R@1 near "
        f"{_f(test['final']['R@1'])} is {_std_err(test['final']['R@1'], n_test):.2f} points on the test set.\n"
    )


def write_report(cfg: ResultsConfig, records: list[StageRecord], wall: float) -> str:
    """Build docs/results.md from the stage files and write it (and its pictures) atomically."""
    out = cfg.output_dir
    pictures = cfg.doc.parent / "results"
    table2, _ = _section_table2(cfg, out)
    score_rules = _section_score_rules(cfg, out)
    table3 = _section_table3(cfg, out, pictures)
    post = {
        s: read_json(out / f"post-{s}" / "post.json") for s, _ in SOURCES if (out / f"post-{s}" / "post.json").is_file()
    }
    tuned = {
        name: read_json(out / name / "tuned.json")
        for name in ("tune-zero-shot", "tune-finetuned")
        if cfg.tune and (out / name / "tuned.json").is_file()
    }
    chosen = choose_method(tuned, post)
    table4 = _section_table4(cfg, post, tuned, chosen)
    heldout = _section_heldout(cfg, out, post, chosen)
    figure = _section_figure(cfg, out, pictures, post, chosen)
    flags = " ".join(_nondefault_flags(cfg))
    header = (
        f"# Results on the demo set\n\nGenerated by `python -m tpas.experiments.results{(' ' + flags) if flags else ''}` "
        f"on {dt.date.today().isoformat()}; every number below comes from that run's stage files under "
        f"`{cfg.output_dir}/` (re-running it redoes only the stages whose settings changed). Machine: "
        f"{_machine()}. Model preset `{cfg.model}`; main run `{cfg.runs_dir / cfg.main_name}` "
        f"({cfg.main_subset or 'all'} pairs, {_plural(cfg.main_epochs, 'epoch')}); seed {cfg.seed}.\n"
    )
    text = "\n".join([header, _section_timing(records, wall), table2, score_rules, table3, table4, heldout, figure])
    write_text(cfg.doc, text)
    return text


def _nondefault_flags(cfg: ResultsConfig) -> list[str]:
    out = []
    defaults = ResultsConfig()
    for f in dataclasses.fields(ResultsConfig):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if value == default or f.name in ("progress", "threads"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        elif isinstance(value, list):
            out += [f"{flag} {v}" for v in value]
        else:
            out.append(f"{flag} {value}")
    return out


# ---------------------------------------------------------------- entry point


def run_results(cfg: ResultsConfig) -> dict:
    """Run every stage that is out of date, then write the report; returns the stage records."""
    started = time.perf_counter()
    if not cfg.sweep_sizes:
        raise TpasError("--sweep-sizes is empty; give at least one subset size for Table 3 (0 = all pairs).")
    if cfg.k < 10 or cfg.sweep_k < 10:
        raise TpasError(
            f"--k {cfg.k} / --sweep-k {cfg.sweep_k}: both must be at least 10 (the length of an answer line)."
        )
    known = getattr(_postprocess(), "METHODS", None)
    unknown = sorted({m for method in cfg.methods for m in _methods(method)} - set(known or []))
    if known is not None and unknown:  # fail now, not after hours of training and inference
        raise TpasError(
            f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)} "
            f"(a comma joins methods applied in order)."
        )
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    stages = Stages(cfg.progress)
    _stage_data(cfg, stages)

    main = _train_config(cfg, cfg.main_name, cfg.main_subset, cfg.runs_dir, epochs=cfg.main_epochs)
    _stage_train(stages, main, f"main run: {cfg.main_subset or 'all'} pairs, {_plural(cfg.main_epochs, 'epoch')}")
    for n in cfg.sweep_sizes:
        tcfg = _train_config(cfg, _sweep_name(cfg.sweep_steps, n), n, cfg.runs_dir / "sweep", steps=cfg.sweep_steps)
        _stage_train(stages, tcfg, f"sweep: {n or 'all'} pairs, {cfg.sweep_steps} steps")

    run = cfg.runs_dir / cfg.main_name
    zero = {"zero_shot": True, "model": cfg.model, "itm": False}
    keys = {
        "zero-shot": _stage_infer(cfg, stages, "zero-shot", "zero-shot, ITC, test", data_root=cfg.data_root, **zero),
        "zero-shot-heldout": _stage_infer(
            cfg,
            stages,
            "zero-shot-heldout",
            "zero-shot, ITC, held-out wording",
            data_root=cfg.data_root,
            query_file="query_heldout.json",
            **zero,
        ),
        "finetuned": _stage_infer(
            cfg, stages, "finetuned", f"main run, ITM top-{cfg.k}, test", data_root=cfg.data_root, run=run, k=cfg.k
        ),
        "heldout": _stage_infer(
            cfg,
            stages,
            "heldout",
            f"main run, ITM top-{cfg.k}, held-out wording",
            data_root=cfg.data_root,
            run=run,
            k=cfg.k,
            query_file="query_heldout.json",
        ),
    }
    for n in cfg.sweep_sizes:
        name = _sweep_name(cfg.sweep_steps, n)
        _stage_infer(
            cfg,
            stages,
            f"sweep-{name}",
            f"sweep run {name}, ITM top-{cfg.sweep_k}, test",
            data_root=cfg.data_root,
            run=cfg.runs_dir / "sweep" / name,
            k=cfg.sweep_k,
        )

    embed = CaptionEmbedder()
    tune_keys: dict[str, dict | None] = {"zero-shot": None, "finetuned": None}
    if cfg.tune:
        keys["zero-shot-val"] = _stage_infer(
            cfg, stages, "zero-shot-val", "zero-shot, ITC, validation set", data_root=cfg.val_root, **zero
        )
        keys["finetuned-val"] = _stage_infer(
            cfg,
            stages,
            "finetuned-val",
            f"main run, ITM top-{cfg.k}, validation set",
            data_root=cfg.val_root,
            run=run,
            k=cfg.k,
        )
        tune_keys["zero-shot"] = _stage_tune(
            cfg, stages, "tune-zero-shot", "zero-shot-val", keys["zero-shot-val"], embed
        )
        tune_keys["finetuned"] = _stage_tune(
            cfg, stages, "tune-finetuned", "finetuned-val", keys["finetuned-val"], embed
        )
    for source, tuned_by in (("zero-shot", "zero-shot"), ("finetuned", "finetuned"), ("heldout", "finetuned")):
        _stage_post(
            cfg,
            stages,
            source,
            source,
            keys[source],
            f"tune-{tuned_by}" if cfg.tune else None,
            tune_keys[tuned_by],
            embed,
        )

    doc_started = time.perf_counter()
    write_report(cfg, stages.records, time.perf_counter() - started)
    doc_seconds = round(time.perf_counter() - doc_started, 1)
    wall = round(time.perf_counter() - started, 1)
    print(
        f"[results] wrote {cfg.doc} and {cfg.doc.parent / 'results'}/ (report {doc_seconds} s); "
        f"{sum(not r.cached for r in stages.records)} of {len(stages.records)} stages ran; {_fmt_seconds(wall)} in all"
    )
    return {"stages": [dataclasses.asdict(r) for r in stages.records], "seconds": wall, "doc": str(cfg.doc)}


main = config_command(
    ResultsConfig,
    help="Regenerate docs/results.md and its pictures (Tables 2-4, held-out "
    "wording, Figure 2) on the demo set; stages whose settings did not "
    "change are skipped.",
)(run_results)


if __name__ == "__main__":
    main()
