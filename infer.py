"""Rank the gallery for every query: ITC over all pairs, ITM re-ranking of the top-k."""

from tpas.cli import config_command
from tpas.retrieval import InferConfig, infer


@config_command(
    InferConfig, help="Retrieve and re-rank; writes outputs/infer/candidates.parquet (+ metrics with ground truth)."
)
def main(cfg: InferConfig) -> None:
    summary = infer(cfg)
    final = summary.get("metrics", {}).get("final")
    metrics = f", R@1 {final['R@1']:.2f}" if final else ""
    print(
        f"ranked {summary['queries']} queries x {summary['gallery']} images (k={summary['k']}) in {summary['seconds']:.0f}s{metrics} -> {cfg.output_dir}"
    )


if __name__ == "__main__":
    main()
