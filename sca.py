#!/usr/bin/env python
"""Post-processing of a stage's candidates: SCA and the other methods of tpas.post, or --tune them."""

from tpas.cli import config_command
from tpas.post.stage import SCAStageConfig, run_sca_stage


@config_command(
    SCAStageConfig,
    help="Post-process ranked candidates with --method (comma list, applied in order; "
    "default sca: similar queries stop sharing one top-1 image); writes "
    "candidates.parquet, changes.parquet/.csv and metrics.json. --tune DIR "
    "grid-searches the methods' parameters on a validation stage and writes "
    "tuned.json, which --params loads.",
)
def main(cfg: SCAStageConfig) -> None:
    run_sca_stage(cfg)


if __name__ == "__main__":
    main()
