"""Fine-tune the retrieval model (ITC + ITM) on a seeded subset of the training pairs.

On several GPUs: `torchrun --nproc_per_node N train.py ...` (DDP; see tpas.train.loop).
"""

import os

from tpas.cli import config_command
from tpas.train import TrainConfig, train


@config_command(
    TrainConfig,
    help="Fine-tune on a seeded subset of PAB's training pairs; writes runs/<name>/. "
    "Multi-GPU: torchrun --nproc_per_node N train.py ... (batch size is per process).",
)
def main(cfg: TrainConfig) -> None:
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    val = summary["val_itc"]
    metrics = f", val R@1 {val['R@1']:.2f}" if val else ""
    print(
        f"trained {summary['steps']} steps on {summary['train_pairs']} pairs in {summary['seconds']:.0f}s{metrics} -> {summary['run_dir']}"
    )


if __name__ == "__main__":
    main()
