#!/usr/bin/env python
"""Similarity Coverage Analysis: similar queries stop sharing one top-1 image (see tpas.sca)."""

from tpas.cli import config_command
from tpas.sca import SCAStageConfig, run_sca_stage


@config_command(SCAStageConfig, help="Group similar queries and resolve shared top-1 images (SCA); "
                                     "writes candidates.parquet, changes.parquet/.csv and metrics.json.")
def main(cfg: SCAStageConfig) -> None:
    run_sca_stage(cfg)


if __name__ == "__main__":
    main()
