"""Fine-tune the retrieval model (ITC + ITM) on a seeded subset of the training pairs."""

from tpas.cli import config_command
from tpas.training import TrainConfig, train


@config_command(TrainConfig, help="Fine-tune on a seeded subset of PAB's training pairs; writes runs/<name>/.")
def main(cfg: TrainConfig) -> None:
    summary = train(cfg)
    val = summary["val_itc"]
    metrics = f", val R@1 {val['R@1']:.2f}" if val else ""
    print(f"trained {summary['steps']} steps on {summary['train_pairs']} pairs in {summary['seconds']:.0f}s{metrics} -> {summary['run_dir']}")


if __name__ == "__main__":
    main()
