"""What each post-processing method gains on one model's lists (Table 4 for any run):

    python -m tpas.experiments.post_gain --val outputs/<run>-val --test outputs/<run>

Each method's parameters are tuned on the validation stage (its ground truth), then the method is
applied with its default and with its tuned parameters, unchanged, to the test stage. Reported:
R@1/5/10 and mAP before and after, the queries whose top-1 became right (fixed) or wrong (broken),
and McNemar's exact two-sided p-value of fixed against broken. Writes `--output` (JSON) and prints
a Markdown table.
"""

# ruff: noqa: RUF009

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpas.cli import config_command, field
from tpas.experiments.results import CaptionEmbedder, _labelled_stage, _methods, _plain, top1_changes
from tpas.io import write_json
from tpas.metrics import ranking_metrics
from tpas.post import methods as post


@dataclass
class PostGainConfig:
    val: Path = field(Path("outputs/infer-val"), "Validation stage dir (infer.py output with ground truth): tuning.")
    test: Path = field(Path("outputs/infer"), "Test stage dir (infer.py output with ground truth): measured.")
    methods: str = field("sca,assign,dual-softmax", "Comma list of methods, each measured alone.")
    output: Path = field(Path("outputs/post_gain.json"), "Where the JSON report goes.")


def post_gain(cfg: PostGainConfig) -> dict[str, Any]:
    embed = CaptionEmbedder()
    val_c, val_q, _, val_emb = _labelled_stage(cfg.val, embed, "tuning needs query_gt.json")
    test_c, test_q, gt, test_emb = _labelled_stage(cfg.test, embed, "measuring needs query_gt.json")
    report: dict[str, Any] = {"val": str(cfg.val), "test": str(cfg.test), "before": ranking_metrics(test_c, gt)}
    for method in _methods(cfg.methods):
        tuned, _ = post.tune(
            val_c, val_q, [method], post.PostprocessConfig(), encoder=embed.encoder, embeddings=val_emb
        )
        report[method] = {"tuned_params": _plain(tuned)}
        for variant, params in (("default", post.PostprocessConfig()), ("tuned", tuned)):
            after, _log = post.apply_methods(
                test_c, test_q, [method], params, encoder=embed.encoder, embeddings=test_emb
            )
            changes = top1_changes(test_c, after, gt)
            changes.pop("changed_queries")
            report[method][variant] = {**ranking_metrics(after, gt), **changes}
    write_json(cfg.output, report)
    before = report["before"]
    print("| method | params | R@1 | ΔR@1 | R@5 | R@10 | fixed | broken | McNemar p |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| none | – | {before['R@1']:.2f} | – | {before['R@5']:.2f} | {before['R@10']:.2f} | – | – | – |")
    for method in _methods(cfg.methods):
        for variant in ("default", "tuned"):
            r = report[method][variant]
            p = "–" if r["p_value"] is None else f"{r['p_value']:.2g}"
            print(
                f"| {method} | {variant} | {r['R@1']:.2f} | {r['R@1'] - before['R@1']:+.2f} | {r['R@5']:.2f} | "
                f"{r['R@10']:.2f} | {r['fixed']} | {r['broken']} | {p} |"
            )
    return report


@config_command(PostGainConfig, help="Tune each post-processing method on --val, measure it on --test (Table 4).")
def main(cfg: PostGainConfig) -> None:
    post_gain(cfg)


if __name__ == "__main__":
    main()
