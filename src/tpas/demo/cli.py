"""The `python -m tpas.demo OUT_DIR` command."""

from __future__ import annotations

from pathlib import Path

import click

from tpas.demo.build import build_demo, render_contact_sheet
from tpas.errors import TpasError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives byte-identical files.")
@click.option("--n-train", default=20000, show_default=True, help="Number of training image-caption pairs.")
@click.option("--n-test", default=2000, show_default=True, help="Number of test query images (one caption each).")
@click.option(
    "--distractor-ratio",
    default=0.5,
    show_default=True,
    help="Extra gallery images without a query, as a fraction of --n-test.",
)
@click.option("--image-height", default=128, show_default=True, help="Height of every image in pixels.")
@click.option("--image-width", default=64, show_default=True, help="Width of every image in pixels.")
@click.option("--workers", default=2, show_default=True, help="Rendering processes (results do not depend on it).")
@click.option("--force", is_flag=True, help="Wipe an existing or half-built demo set in OUT_DIR and rebuild it.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option(
    "--contact-sheet",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also save a PNG with example images of every action to this path.",
)
def main(
    out_dir: Path,
    seed: int,
    n_train: int,
    n_test: int,
    distractor_ratio: float,
    image_height: int,
    image_width: int,
    workers: int,
    force: bool,
    progress: bool,
    contact_sheet: Path | None,
) -> None:
    """Render the offline demo set (PAB layout plus the challenge's name-masked test set) into OUT_DIR."""
    try:
        s = build_demo(
            out_dir,
            seed=seed,
            n_train=n_train,
            n_test=n_test,
            distractor_ratio=distractor_ratio,
            image_size=(image_height, image_width),
            workers=workers,
            progress=progress,
            force=force,
        )
        if contact_sheet is not None:
            render_contact_sheet(contact_sheet, seed=seed, image_size=(image_height, image_width))
    except TpasError as exc:
        raise click.ClickException(str(exc)) from None
    verb = "already built" if s["reused"] else f"built in {s['seconds']:.1f} s"
    click.echo(
        f"demo set {verb}: {s['n_train']} train pairs ({s['n_train_normal']} normal, "
        f"{s['n_train_abnormal']} abnormal, {s['n_videos']} videos), {s['n_test']} test queries, "
        f"{s['n_distractors']} distractors, {s['n_gallery']} gallery images -> {s['out_dir']}"
    )
