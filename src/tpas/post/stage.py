"""The sca.py stage: read a stage dir, apply `--method` (tpas.post.methods), write a stage dir; or `--tune`.

Outputs (one staged dir, swapped in whole): candidates.parquet (the schema of tpas.schema),
queries.parquet (copied), changes.parquet / changes.csv (the change log, LOG_COLUMNS),
sca_config.json, postprocess.json (per-method steps and timings) and, with ground truth,
metrics.json. With `--tune DIR`: OUTPUT_DIR/tuned.json only, which `--params` loads.
"""
# ruff: noqa: RUF009  (tpas.cli.field() defaults carry the --help text, as in every config)

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tpas.cli import field, given_fields
from tpas.errors import TpasError
from tpas.io import staged_dir, write_bytes, write_json, write_parquet, write_text
from tpas.metrics import ranking_metrics
from tpas.post.methods import (
    METHODS,
    REGISTRY,
    PostprocessConfig,
    apply_methods_with_info,
    load_params,
    parse_methods,
    tune,
)
from tpas.post.sca import Encoder
from tpas.schema import (
    CANDIDATES_FILE,
    QUERIES_FILE,
    ground_truth,
    read_candidates,
    read_queries,
)

TUNED_FILE = "tuned.json"
SCA_OUTPUTS = (
    CANDIDATES_FILE,
    QUERIES_FILE,
    "changes.parquet",
    "changes.csv",
    "sca_config.json",
    "postprocess.json",
    "metrics.json",
)


@dataclass
class SCAStageConfig(PostprocessConfig):
    input_dir: Path = field(Path("outputs/infer"), help="Stage dir to read: candidates.parquet + queries.parquet.")
    output_dir: Path = field(
        Path("outputs/sca"),
        help="Where to write the re-ranked candidates and the change log (with --tune: tuned.json only).",
    )
    method: str = field(
        "",
        help=f"Comma list of methods applied in order, from {', '.join(METHODS)} "
        "(default: sca, or the methods in --params).",
    )
    tune: Path | None = field(
        None,
        help="Validation stage dir with ground truth: grid-search the methods' "
        "parameters on it and write OUTPUT_DIR/tuned.json (nothing else).",
    )
    params: Path | None = field(
        None, help="tuned.json from --tune: its values (and methods) replace the flags left at their defaults."
    )
    cache_dir: Path | None = field(Path("outputs/cache"), help="Sentence-embedding cache (keyed by the caption texts).")

    def postprocess(self) -> PostprocessConfig:
        return PostprocessConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PostprocessConfig)})


def _resolve(cfg: SCAStageConfig) -> tuple[PostprocessConfig, list[str]]:
    params, methods = cfg.postprocess(), parse_methods(cfg.method) if cfg.method else ["sca"]
    if cfg.params is not None:
        tuned, tuned_methods = load_params(cfg.params)
        # A flag not given takes the file's value; a flag given on the command line wins, even
        # when it repeats the default (tpas.cli.given_fields; in Python: differs from the default).
        given = given_fields(cfg)
        changed = {f.name: getattr(params, f.name) for f in dataclasses.fields(PostprocessConfig) if f.name in given}
        params = tuned.replace(**changed)
        methods = parse_methods(cfg.method) if cfg.method else tuned_methods
    return params, methods


def _read_stage(stage_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    candidates, queries = read_candidates(stage_dir), read_queries(stage_dir)
    unknown = set(candidates["query_index"].astype(str)) - set(queries["query_index"].astype(str))
    if unknown:
        raise TpasError(
            f"{Path(stage_dir) / CANDIDATES_FILE}: {len(unknown)} query id(s) (e.g. {min(unknown)}) "
            f"are not in {QUERIES_FILE}; re-run the stage that wrote {stage_dir}."
        )
    return candidates, queries


def run_sca_stage(cfg: SCAStageConfig, encoder: Encoder | None = None) -> dict[str, Any]:
    """Read a stage dir, apply the methods, write output_dir; returns the summary. With `tune`: tune only."""
    params, methods = _resolve(cfg)
    out = Path(cfg.output_dir)
    if cfg.tune is not None:
        candidates, queries = _read_stage(Path(cfg.tune))
        _, report = tune(candidates, queries, methods, params, encoder=encoder, cache_dir=cfg.cache_dir, progress=print)
        report["validation"] = str(cfg.tune)
        write_json(out / TUNED_FILE, report)
        print(
            f"tune: R@1 {report['baseline']['R@1']:.2f} → {report['final']['R@1']:.2f} on {cfg.tune} "
            f"({report['final']['queries']} queries); wrote {out / TUNED_FILE}"
        )
        return report

    candidates, queries = _read_stage(Path(cfg.input_dir))
    new, changes, info = apply_methods_with_info(
        candidates, queries, methods, params, encoder=encoder, cache_dir=cfg.cache_dir
    )
    steps = info["steps"]
    gt = ground_truth(queries)
    metrics = {"before": ranking_metrics(candidates, gt), "after": ranking_metrics(new, gt)} if gt is not None else None
    # the whole stage dir at once (a kill leaves the previous one complete); a tuned.json there stays
    with staged_dir(out, SCA_OUTPUTS, "sca") as part:
        write_parquet(part / CANDIDATES_FILE, new)
        write_bytes(part / QUERIES_FILE, (Path(cfg.input_dir) / QUERIES_FILE).read_bytes())
        write_parquet(part / "changes.parquet", changes)
        write_text(part / "changes.csv", changes.to_csv(index=False, float_format="%.6g"))
        write_json(
            part / "sca_config.json",
            {**dataclasses.asdict(cfg), "methods": methods, "resolved": dataclasses.asdict(params)},
        )
        write_json(part / "postprocess.json", {"methods": methods, "steps": steps, "grouping": info["grouping"]})
        if metrics is not None:
            write_json(part / "metrics.json", metrics)

    summary: dict[str, Any] = {
        "queries": len(queries),
        "methods": methods,
        "steps": steps,
        "queries_changed": int(changes["query_index"].nunique()),
        "moves": len(changes),
    }
    for step in steps:  # a method's summary keys, from its first step
        for key in REGISTRY[step["method"]].summary:
            summary.setdefault(key, step[key])
    for step in steps:
        line = REGISTRY[step["method"]].describe(step, len(queries))
        if "metrics" in step:
            line += f"; R@1 {step['metrics']['R@1']:.2f}"
        print(line)
    if metrics is not None:
        summary["metrics"] = metrics
        print(
            "metrics: "
            + "  ".join(f"{k} {metrics['before'][k]:.2f} → {metrics['after'][k]:.2f}" for k in ("R@1", "R@5", "R@10"))
        )
    return summary
