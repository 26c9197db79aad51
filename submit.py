#!/usr/bin/env python
"""Write the challenge answer.txt + answer.zip, or validate one with --check (see tpas.submission)."""

import sys

from tpas.cli import config_command
from tpas.submission import SubmitConfig, run_submit_stage


@config_command(
    SubmitConfig,
    help="Write answer.txt and answer.zip from a stage dir's candidates, "
    "or, with --check FILE, validate an answer file (exit 0 valid, 1 not).",
)
def main(cfg: SubmitConfig) -> None:
    summary = run_submit_stage(cfg)
    if cfg.check is not None and not summary["valid"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
