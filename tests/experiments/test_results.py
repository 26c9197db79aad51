"""`python -m tpas.experiments.results` on a tiny demo set: the report, its pictures, its numbers, the stage cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from tpas.errors import TpasError
from tpas.experiments import figures
from tpas.experiments import results as results_lib
from tpas.experiments.results import (
    STAGE_FILE,
    ResultsConfig,
    config_differences,
    run_results,
    top1_changes,
)
from tpas.metrics import ranking_metrics
from tpas.schema import ground_truth, read_candidates, read_queries

HEADINGS = [
    "## Wall time of each stage",
    "## Table 2: zero-shot vs fine-tuned",
    "## Score rules",
    "## Table 3: training-subset size at equal compute",
    "## Table 4: post-processing",
    "### zero-shot candidates",
    "### fine-tuned candidates",
    "### held-out wording candidates",
    "## Held-out wording",
    "## Figure 2: ranked lists",
]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, tiny_demo: Path) -> tuple[ResultsConfig, dict]:
    root = tmp_path_factory.mktemp("results")
    # The session's demo set: the results page only reads its data root (the val set is its own).
    cfg = ResultsConfig(
        data_root=tiny_demo,
        val_root=root / "val",
        val_queries=20,
        runs_dir=root / "runs",
        main_subset=96,
        main_epochs=1,
        model="tiny",
        batch_size=16,
        val_size=32,
        k=10,
        sweep_sizes=[40, 0],
        sweep_steps=2,
        sweep_k=10,
        methods=["sca", "dual-softmax,sca"],
        output_dir=root / "out",
        cache_dir=root / "cache",
        doc=root / "docs" / "results.md",
        figure_queries=4,
        threads=1,
        progress=False,
    )
    return cfg, run_results(cfg)


def _section(doc: str, heading: str) -> str:
    start = doc.index(heading)
    end = doc.find("\n## ", start + len(heading))
    return doc[start : end if end >= 0 else None]


def _rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows in `text`, keyed by their first cell (the last row wins on repeats)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _cells(metrics: dict, keys: tuple[str, ...] = ("R@1", "R@5", "R@10", "mAP", "mINP")) -> list[str]:
    return [f"{metrics[k]:.2f}" for k in keys]


def test_report_has_every_section_and_picture(first_run: tuple[ResultsConfig, dict]) -> None:
    cfg, summary = first_run
    doc = cfg.doc.read_text(encoding="utf-8")
    for heading in HEADINGS:
        assert heading in doc, heading
    pictures = cfg.doc.parent / "results"
    for name in ("table3.png", "figure2.png"):
        assert (pictures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (pictures / "figure2.html").read_text(encoding="utf-8")
    assert page.count('class="gt"') >= 1 and "data:image/jpeg;base64," in page
    assert "](results/figure2.png)" in doc and "](results/table3.png)" in doc and "](results/figure2.html)" in doc
    assert all(not r["cached"] for r in summary["stages"])
    names = [r["name"] for r in summary["stages"]]
    assert {
        "data",
        "train/demo",
        "train/steps2-subset-40",
        "train/steps2-subset-0",
        "zero-shot",
        "finetuned",
        "heldout",
        "finetuned-val",
        "tune-finetuned",
        "post-finetuned",
        "post-heldout",
    } <= set(names)
    # every stage's wall time is in the timing table, as recorded in its stage.json
    timing = _rows(_section(doc, "## Wall time of each stage"))
    recorded = json.loads((cfg.output_dir / "finetuned" / STAGE_FILE).read_text())
    assert timing["`finetuned`"][1] == f"{recorded['seconds']:.1f} s"


def test_numbers_match_the_stage_files(first_run: tuple[ResultsConfig, dict]) -> None:
    cfg, _ = first_run
    out, doc = cfg.output_dir, cfg.doc.read_text(encoding="utf-8")

    table2 = _rows(_section(doc, "## Table 2"))
    zero = json.loads((out / "zero-shot" / "metrics.json").read_text())
    main_run = json.loads((out / "finetuned" / "metrics.json").read_text())
    assert table2["zero-shot, ITC"] == _cells(zero["itc"])
    assert table2["fine-tuned (demo), ITC only"] == _cells(main_run["itc"])
    assert table2["fine-tuned, ITC top-10 re-ranked by `--score tpas` (default)"] == _cells(main_run["final"])
    assert table2["fine-tuned, ITC top-10 re-ranked by ITM alone (log-odds)"] == _cells(
        main_run["by_score"]["log-odds"]
    )

    rules = _rows(_section(doc, "## Score rules"))
    rules.pop("rule")  # the header
    val_run = json.loads((out / "finetuned-val" / "metrics.json").read_text())
    assert set(rules) == {"`xvlm`", "`cmp`", "`blip`", "`log-odds`", "`tpas` (default)", "`itc`"}
    for name, row in rules.items():
        rule = name.split("`")[1]
        assert row[2:] == [
            f"{val_run['by_score'][rule]['R@1']:.2f}",
            *_cells(main_run["by_score"][rule], ("R@1", "R@5", "R@10")),
        ]
    assert main_run["by_score"]["tpas"] == main_run["final"]  # the default rule is the ranking written

    table3 = _rows(_section(doc, "## Table 3"))
    for n, label in ((40, "40"), (0, "all (208)")):
        metrics = json.loads((out / f"sweep-steps2-subset-{n}" / "metrics.json").read_text())["final"]
        history = json.loads((cfg.runs_dir / "sweep" / f"steps2-subset-{n}" / "history.json").read_text())
        row = table3[label]
        assert row[3:8] == [f"{history[-1]['val_itc']['R@1']:.2f}", *_cells(metrics, ("R@1", "R@5", "R@10", "mAP"))]

    table4 = _section(doc, "## Table 4")
    for source in ("zero-shot", "finetuned", "heldout"):
        post = json.loads((out / f"post-{source}" / "post.json").read_text())
        candidates = read_candidates(out / source)
        gt = ground_truth(read_queries(out / source))
        assert post["rows"][0]["R@1"] == pytest.approx(ranking_metrics(candidates, gt)["R@1"])
        label = {"zero-shot": "### zero-shot", "finetuned": "### fine-tuned", "heldout": "### held-out"}[source]
        block = table4[table4.index(label) :]
        block = block[: block.index("**What this shows.**")]
        lines = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| method")]
        assert len(lines) == len(post["rows"]) == 1 + 2 * len(cfg.methods)
        for line, row in zip(lines, post["rows"]):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert cells[:5] == [row["method"], row["variant"], *_cells(row, ("R@1", "R@5", "R@10"))]
            assert cells[6] == str(row["top1_changed"])
            if row["method"] != "none":  # the saved top-10 lists reproduce the row's numbers
                top10 = pd.read_parquet(
                    out / f"post-{source}" / f"{row['method'].replace(',', '+')}-{row['variant']}.parquet"
                )
                again = ranking_metrics(top10, gt)
                assert [again[k] for k in ("R@1", "R@5", "R@10")] == pytest.approx(
                    [row[k] for k in ("R@1", "R@5", "R@10")]
                )
                assert top1_changes(candidates, top10, gt)["top1_changed"] == row["top1_changed"]

    heldout = _rows(_section(doc, "## Held-out wording"))
    main_h = json.loads((out / "heldout" / "metrics.json").read_text())["final"]
    assert heldout["fine-tuned, ITM + ITC"] == [
        *_cells(main_run["final"], ("R@1", "R@5", "R@10")),
        *_cells(main_h, ("R@1", "R@5", "R@10")),
    ]


def test_second_run_skips_every_stage(first_run: tuple[ResultsConfig, dict]) -> None:
    cfg, first = first_run
    stage_files = sorted(cfg.output_dir.glob(f"*/{STAGE_FILE}"))
    before = {p: p.stat().st_mtime_ns for p in stage_files}
    cfg.doc.unlink()
    second = run_results(cfg)
    assert [r["name"] for r in second["stages"]] == [r["name"] for r in first["stages"]]
    assert all(r["cached"] for r in second["stages"]), [r["name"] for r in second["stages"] if not r["cached"]]
    # a cached stage reports the time recorded when it ran
    assert [r["seconds"] for r in second["stages"]] == [r["seconds"] for r in first["stages"]]
    assert {p: p.stat().st_mtime_ns for p in stage_files} == before
    assert all(h in cfg.doc.read_text(encoding="utf-8") for h in HEADINGS)


def test_a_changed_setting_reruns_only_what_depends_on_it(first_run: tuple[ResultsConfig, dict]) -> None:
    cfg, _ = first_run
    third = run_results(dataclasses.replace(cfg, methods=["sca"]))
    ran = {r["name"] for r in third["stages"] if not r["cached"]}
    assert ran == {"tune-zero-shot", "tune-finetuned", "post-zero-shot", "post-finetuned", "post-heldout"}
    post = json.loads((cfg.output_dir / "post-finetuned" / "post.json").read_text())
    assert [r["method"] for r in post["rows"]] == ["none", "sca", "sca"]


def test_config_comparison_ignores_cosmetic_and_missing_fields() -> None:
    saved = {"subset": 1000, "epochs": 3, "progress": True, "workers": 1, "data_root": "data/demo"}
    assert (
        config_differences(
            saved,
            {"subset": 1000, "epochs": 3, "progress": False, "workers": 4, "data_root": "data/demo", "amp": False},
        )
        == []
    )
    assert config_differences(saved, {"subset": 2000, "epochs": 3}) == ["subset"]
    assert config_differences({"infer": {"k": 128}}, {"infer": {"k": 32}}) == ["infer.k"]


def test_a_run_trained_with_other_settings_is_an_error(tmp_path: Path) -> None:
    cfg = ResultsConfig(data_root=tmp_path / "demo", runs_dir=tmp_path / "runs", model="tiny")
    run = tmp_path / "runs" / "sweep" / "steps300-subset-1000"
    run.mkdir(parents=True)
    saved = dataclasses.asdict(results_lib._train_config(cfg, run.name, 2000, run.parent, steps=300))
    (run / "config.json").write_text(json.dumps({"train": saved}, default=str))
    with pytest.raises(TpasError, match="subset"):
        wanted = results_lib._train_config(cfg, run.name, 1000, run.parent, steps=300)
        results_lib._stage_train(results_lib.Stages(False), wanted, "sweep")


def test_top1_changes_counts_fixed_and_broken() -> None:
    def frame(tops: dict[str, list[str]]) -> pd.DataFrame:
        return pd.DataFrame(
            [(q, r + 1, img) for q, imgs in tops.items() for r, img in enumerate(imgs)],
            columns=["query_index", "rank", "image"],
        )

    gt = {"a": "x", "b": "y", "c": "z", "d": "w"}
    before = frame({"a": ["p", "x"], "b": ["y", "q"], "c": ["r", "s"], "d": ["w", "t"]})
    after = frame({"a": ["x", "p"], "b": ["q", "y"], "c": ["s", "r"], "d": ["w", "t"]})
    got = top1_changes(before, after, gt)
    assert (got["top1_changed"], got["fixed"], got["broken"]) == (3, 1, 1)
    assert sorted(got["changed_queries"]) == ["a", "b", "c"] and got["p_value"] == pytest.approx(1.0)


def test_help_lists_every_flag() -> None:
    result = CliRunner().invoke(results_lib.main, ["--help"])
    assert result.exit_code == 0
    for f in dataclasses.fields(ResultsConfig):
        assert "--" + f.name.replace("_", "-") in result.output


def test_ranked_lists_pictures_mark_the_true_image(tmp_path: Path) -> None:
    paths = {}
    for i in range(12):
        paths[f"g{i}"] = str(tmp_path / f"g{i}.jpg")
        Image.new("RGB", (64, 128), (20 * i, 90, 160)).save(paths[f"g{i}"])
    ten = [f"g{i}" for i in range(10)]
    after = ["g3", *[g for g in ten if g != "g3"]]
    panels = [
        figures.QueryPanel(
            "q1",
            "a man lying on the pavement",
            "g3",
            "fixed by sca",
            [figures.RankedRow("before", ten), figures.RankedRow("after", after)],
        ),
        figures.QueryPanel("q2", "a very long caption " * 20, "g11", "ordinary", [figures.RankedRow("top-10", ten)]),
    ]
    figures.ranked_lists_png(tmp_path / "f.png", panels, paths, "title")
    figures.ranked_lists_html(tmp_path / "f.html", panels, paths, "title")
    page = (tmp_path / "f.html").read_text(encoding="utf-8")
    # 3 ranked rows of 10, plus the true image after each query's first row
    assert page.count("<img") == 32
    # g3 framed in both rows and as the true image; g11 (not retrieved) only as the true image
    assert page.count('class="gt"') == 4
    with Image.open(tmp_path / "f.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    assert (pixels == figures.TRUE_COLOUR).all(axis=2).sum() > 100  # the green frames are drawn


def test_an_unknown_method_fails_before_any_work(tmp_path: Path) -> None:
    cfg = ResultsConfig(data_root=tmp_path / "demo", output_dir=tmp_path / "out", methods=["sca", "dual-softmax,nope"])
    with pytest.raises(TpasError, match="nope"):
        run_results(cfg)
    assert not (tmp_path / "out").exists()
