"""Fine-tuning: ITC + ITM on a seeded subset of the training pairs, with exact resume.

A run directory `runs/<name>/` holds:
- config.json: the resolved TrainConfig and ModelConfig (rebuilds the model);
- subset.json: the image_ids of the training subset and of the validation part;
- model.safetensors: the latest weights (what infer.py loads);
- checkpoint/: model.safetensors + train_state.pt (optimizer, schedule, RNG, position), swapped in
  as a whole so an interrupted save never leaves a mixed checkpoint;
- history.json: per-epoch loss and validation R@1/5/10, mAP, mINP (ITC ranking);
- tower_warmup.safetensors (with --tower-warmup): the image tower as the warm-up left it, which a
  resume loads before it caches the tower's outputs.

The same loop runs on a CPU or a GPU (`--device`, `--precision`) and on several GPUs with
`torchrun --nproc_per_node N train.py ...` (DDP): each of the N processes takes its own
`--batch-size` pairs of every global batch (a disjoint slice of the same seeded permutation), the
ITC/ITM negatives are gathered over all N (tpas.models.losses), gradients are averaged, so one optimizer
step sees batch_size x N x grad_accum pairs. Only rank 0 writes files, validates and prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tpas import distributed
from tpas import models as model_lib
from tpas.cli import given_fields
from tpas.data import (
    check_images,
    ensure_data,
    load_rgb,
    load_train_annotations,
    resolve_image,
    split_train_val,
    stable_seed,
)
from tpas.errors import TpasError
from tpas.io import read_json, write_json
from tpas.metrics import format_metrics, matrix_metrics
from tpas.models.losses import WordHead, word_vocab
from tpas.models.run import load_weights, save_weights
from tpas.models.text import TextPipeline
from tpas.runtime import Runtime, resolve_runtime
from tpas.train import features
from tpas.train.checkpoint import (
    _describe_report,
    _load_train_state,
    _set_rng_state,
    find_checkpoint,
    load_init,
    save_checkpoint,
)
from tpas.train.config import (
    LOCATION_FIELDS,
    RUNTIME_FIELDS,
    SCHEDULE_FIELDS,
    TrainConfig,
    model_config_for,
)
from tpas.train.data import (
    ClusteredSampler,
    PairDataset,
    ResizedImages,
    ResumableSampler,
    auto_workers,
    build_image_cache,
    caption_clusters,
    leading_resize,
    make_collate,
    make_loader,
)
from tpas.train.dropout import use_fast_dropout
from tpas.train.swaps import with_swapped_negatives
from tpas.train.warmup import warm_tower, word_targets

# --word-loss and --tower-warmup predict the word pieces found in at least this many training captions
WORD_MIN_CAPTIONS = 5
# the tower as --tower-warmup left it, which a resume reads back before it caches the tower's outputs
TOWER_WARMUP_FILE = "tower_warmup.safetensors"


def batch_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's keyword arguments from a collated batch, on `device`."""
    keys = (
        "images",
        "input_ids",
        "attention_mask",
        "hard_images",
        "hard_input_ids",
        "hard_attention_mask",
        "image_features",
        "hard_image_features",
        "text_states",
        "hard_text_states",
    )
    inputs = {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}
    inputs.setdefault("images", None)  # cached image features instead
    return inputs


def training_step(
    net: torch.nn.Module,
    micro_batches: list[dict],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
    timings: dict[str, float] | None = None,
) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation when more than one).

    `net` is the model or its DDP / compiled wrapper. Returns the losses averaged over the
    micro-batches and the processes. `timings`, when given, gets the seconds spent in forward,
    backward and optimizer added to it (with CUDA synchronised at each boundary).
    """

    def lap(name: str, since: float) -> float:
        if timings is None:
            return since
        runtime.synchronize()
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - since
        return now

    clock = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    count, no_sync = len(micro_batches), getattr(net, "no_sync", None)
    parts = []
    for i, batch in enumerate(micro_batches):
        # DDP all-reduces the gradients once, in the last micro-batch's backward
        sync = no_sync() if no_sync is not None and i < count - 1 else contextlib.nullcontext()
        with sync:
            with runtime.autocast():
                out = net(**batch_inputs(batch, runtime.device))
            clock = lap("forward", clock)
            scaler.scale(out["loss"] / count if count > 1 else out["loss"]).backward()
            clock = lap("backward", clock)
        word = out.get("loss_word", torch.zeros_like(out["loss"]))
        parts.append(torch.stack([out["loss"], out["loss_itc"], out["loss_itm"], word]).detach().float())
    scaler.step(optimizer)
    scaler.update()
    lap("optimizer", clock)
    losses = torch.stack(parts).mean(0) if count > 1 else parts[0]
    if runtime.world_size > 1:  # each rank's loss covers its own rows: the mean is the global batch's
        dist.all_reduce(losses)
        losses = losses / runtime.world_size
    loss, itc, itm, word = losses.tolist()
    return {"loss": loss, "loss_itc": itc, "loss_itm": itm, "loss_word": word}


@torch.inference_mode()
def validate(
    model: model_lib.RetrievalModel,
    frame: pd.DataFrame,
    data_root: Path,
    transform: Any,
    text: TextPipeline,
    batch_size: int = 64,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """ITC text→image retrieval over the held-out pairs (gallery = their distinct images)."""
    runtime = runtime or Runtime()
    model.eval()
    images = list(dict.fromkeys(frame["image"]))
    column = {image: i for i, image in enumerate(images)}
    image_feats, text_feats = [], []
    with runtime.autocast():
        for start in range(0, len(images), batch_size):
            batch = torch.stack(
                [transform(load_rgb(resolve_image(data_root, p))) for p in images[start : start + batch_size]]
            )
            image_feats.append(model.encode_image(batch.to(runtime.device))[1].float())
        captions = frame["caption"].tolist()
        for start in range(0, len(captions), batch_size):
            tokens = text(captions[start : start + batch_size])
            text_feats.append(
                model.encode_text(tokens["input_ids"].to(runtime.device), tokens["attention_mask"].to(runtime.device))[
                    1
                ].float()
            )
    scores = (torch.cat(text_feats) @ torch.cat(image_feats).T).cpu().numpy()
    model.train()
    return matrix_metrics(scores, [column[p] for p in frame["image"]])


def _prepare_data(cfg: TrainConfig, run_dir: Path, resumed: dict | None) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    frame, problems = load_train_annotations(cfg.data_root, cfg.on_bad_sample)
    if resumed is not None:  # the exact pairs of the original run, whatever the data dir holds now
        by_id = frame.set_index("image_id", drop=False)
        missing = [i for i in resumed["train"] + resumed["val"] if i not in by_id.index]
        if missing:
            raise TpasError(
                f"{run_dir / 'subset.json'}: {len(missing)} saved image_ids (e.g. {missing[0]}) are not in "
                f"{cfg.data_root}; resume with the data the run started with."
            )
        return (
            by_id.loc[resumed["train"]].reset_index(drop=True),
            by_id.loc[resumed["val"]].reset_index(drop=True),
            len(problems),
        )
    train, val = split_train_val(frame, cfg.subset or None, cfg.val_size, cfg.seed)
    columns = ("image", "hard_i") if cfg.pab_hard_negatives else ("image",)

    def usable(part: pd.DataFrame) -> pd.DataFrame:
        """`part` less the rows whose images do not decode (or stop, with --on-bad-sample fail)."""
        bad = check_images(part, cfg.data_root, columns, progress=cfg.progress)
        if bad and cfg.on_bad_sample == "fail":
            raise TpasError(bad[0].sentence() + "; fix it or pass --on-bad-sample skip.")
        if not bad:
            return part
        problems.extend(bad)
        bad_rows = {(Path(p.file).name, p.line) for p in bad}
        keep = [(f, line) not in bad_rows for f, line in zip(part["file"], part["line"])]
        return part[keep].reset_index(drop=True)

    train, val = usable(train), usable(val)
    return train, val, len(problems)


def _readable_captions(part: pd.DataFrame, text: TextPipeline, cfg: TrainConfig) -> tuple[pd.DataFrame, int]:
    """`part` less the captions the model's text pipeline cleans to nothing (X-VLM's pre_caption
    leaves nothing of "..."), or a TpasError naming the first one with --on-bad-sample fail."""
    keep = []
    for caption in part["caption"]:
        try:
            text.clean(caption)
            keep.append(True)
        except ValueError:
            keep.append(False)
    bad = [i for i, ok in enumerate(keep) if not ok]
    if bad and cfg.on_bad_sample == "fail":
        row = part.iloc[bad[0]]
        where = f"{row['file']} line {row['line']}" if "file" in part and "line" in part else f"pair {row['image_id']}"
        text.check([row["caption"]], [where], str(cfg.data_root))
    return part[keep].reset_index(drop=True), len(bad)


def _resolved_config(cfg: TrainConfig, run_dir: Path, given: set[str]) -> tuple[TrainConfig, list[str]]:
    """The saved config of the run being resumed, with this command's runtime settings and the
    flags it was given (see the *_FIELDS above), and the notes to print. A TpasError when a given
    flag would change what the run is."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in read_json(run_dir / "config.json")["train"].items() if k in known}
    for key in ("data_root", "runs_dir", "init"):
        if saved.get(key):
            saved[key] = Path(saved[key])
    saved.setdefault("batch_clusters", 0)  # a run saved before look-alike batches existed trained on random ones
    saved.setdefault("cluster_by_colour", False)  # and one saved before --cluster-by-colour, on plain clusters
    saved.setdefault("tower_warmup", 0)  # and one saved before --tower-warmup, on the pretrained tower
    merged = TrainConfig(**saved)
    notes, refused = [], []
    for name in sorted(known):
        mine, theirs = getattr(cfg, name), getattr(merged, name)
        if name in RUNTIME_FIELDS:
            setattr(merged, name, mine)
        elif name not in given or mine == theirs:
            continue
        elif name == "init":
            notes.append(f"--init {mine} is ignored: the run resumes from its own checkpoint")
        elif name in LOCATION_FIELDS:
            notes.append(f"--{name.replace('_', '-')} {mine} (the run was started with {theirs})")
            setattr(merged, name, mine)
        elif name in SCHEDULE_FIELDS:
            notes.append(
                f"--{name} {mine} given: the run was started with {theirs}, and its learning-rate schedule now "
                f"decays over the new length, so it will not match a run started with --{name} {mine}"
            )
            setattr(merged, name, mine)
            if name == "epochs" and "steps" not in given:
                merged.steps = None  # --epochs replaces a saved step budget
        else:
            refused.append(f"--{name.replace('_', '-')} {mine} (saved: {theirs})")
    if refused:
        raise TpasError(
            f"{run_dir}: --resume continues the run as it was started, but {', '.join(refused)} would change "
            f"it; drop {'that flag' if len(refused) == 1 else 'those flags'}, or start a new run with --name."
        )
    merged.__post_init__()
    return merged, notes


def _clear_run(run_dir: Path) -> None:
    """Empty a run dir that never reached a checkpoint, but for its config.json (rewritten later:
    a kill before that must still leave a run that --resume can start again)."""
    for path in run_dir.iterdir():
        if path.name == "config.json":
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def train(cfg: TrainConfig) -> dict:
    """Fine-tune and return a summary; everything is written under runs/<name>/ (by rank 0)."""
    started_group = distributed.init_from_env(
        "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    run_dir = Path(cfg.runs_dir) / cfg.name
    created = not run_dir.exists()
    try:
        return _train(cfg)
    except TpasError:
        # a new run refused before its first checkpoint (bad data, a bad flag) leaves nothing behind,
        # so the corrected command simply runs
        if created and run_dir.is_dir() and find_checkpoint(run_dir) is None and distributed.rank_and_world()[0] == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if started_group:
            dist.destroy_process_group()


def _open_run(cfg: TrainConfig) -> tuple[TrainConfig, Path, Path | None, model_lib.ModelConfig | None, list[str]]:
    """(config to run, run dir, checkpoint to resume or None, the run's saved ModelConfig on a
    resume, notes): a new run must not exist yet, a resumed one must (see _resolved_config)."""
    given = given_fields(cfg)
    run_dir = Path(cfg.runs_dir) / cfg.name
    started_before = (run_dir / "config.json").is_file()
    if cfg.resume and not started_before:
        raise TpasError(f"{run_dir}: no run to resume here; drop --resume to start a new run.")
    if not cfg.resume and started_before:
        raise TpasError(
            f"{run_dir}: a run with this name exists; pass --resume to continue it (a run that stopped "
            f"before its first checkpoint starts again) or --name for a new one."
        )
    if not cfg.resume:
        return cfg, run_dir, None, None, []
    checkpoint = find_checkpoint(run_dir)
    cfg, notes = _resolved_config(cfg, run_dir, given)
    # the model (and its text pipeline) is what the run was built with, whatever the preset says today
    saved_model = model_lib.ModelConfig.from_dict(read_json(run_dir / "config.json")["model"])
    return cfg, run_dir, checkpoint, saved_model, notes


class _Trainer:
    """One train() call, in phases: the pairs, the model, its optimizer (restored on a resume),
    the epochs, the final weights. Only rank 0 writes files, validates and prints."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.run_dir, self.checkpoint, saved_model, notes = _open_run(cfg)
        self.runtime = resolve_runtime(self.cfg.device, self.cfg.precision)
        self.say = print if self.runtime.is_main else (lambda *args, **kwargs: None)
        for note in notes:
            self.say(f"note: {note}")
        if self.cfg.resume and self.checkpoint is None:
            self.say(
                f"{self.run_dir}: stopped before its first checkpoint; starting it again from step 0 with its "
                f"saved settings"
            )
            if self.runtime.is_main:
                _clear_run(self.run_dir)
        self.runtime.barrier()  # every rank has seen the run dir as it was before rank 0 writes into it
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.started = time.time()
        self.model_cfg = saved_model or model_config_for(self.cfg)
        if self.runtime.is_main and self.checkpoint is None:
            # first of all: a run killed at any point after this can be started again by --resume
            self._write_config()
        self.history: list[dict] = []
        self.warmup: dict | None = None  # what --tower-warmup did in this process (None: not run here)
        self.position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "world_size": self.runtime.world_size}

    def _write_config(self) -> None:
        write_json(self.run_dir / "config.json", {"train": self.cfg, "model": dataclasses.asdict(self.model_cfg)})

    # ---- the pairs

    def prepare_pairs(self) -> None:
        cfg, runtime = self.cfg, self.runtime
        resumed_subset = read_json(self.run_dir / "subset.json") if self.checkpoint is not None else None
        if runtime.is_main:
            ensure_data(cfg.data_root, cfg.seed)
            train_frame, val_frame, skipped = _prepare_data(cfg, self.run_dir, resumed_subset)
            if self.checkpoint is None:
                write_json(
                    self.run_dir / "subset.json",
                    {
                        "seed": cfg.seed,
                        "train": train_frame["image_id"].tolist(),
                        "val": val_frame["image_id"].tolist(),
                    },
                )
        runtime.barrier()
        if not runtime.is_main:  # the pairs rank 0 chose (and checked)
            train_frame, val_frame, skipped = _prepare_data(cfg, self.run_dir, read_json(self.run_dir / "subset.json"))
        self.per_step = cfg.batch_size * runtime.world_size * cfg.grad_accum
        self.text = model_lib.build_text_pipeline(self.model_cfg)
        self.train_frame, bad_train = _readable_captions(train_frame, self.text, cfg)
        self.train_frame, swaps = with_swapped_negatives(self.train_frame, cfg.swap_negatives, cfg.seed)
        if swaps and runtime.is_main:
            print(
                f"swapped negatives: {swaps} of {len(self.train_frame)} pairs' hard captions are now their caption "
                "with one garment type or the gender swapped"
            )
        self.val_frame, bad_val = _readable_captions(val_frame, self.text, cfg)
        self.skipped = skipped + bad_train + bad_val
        if cfg.steps:  # a step budget: enough epochs to hold it, the last one cut short
            budget_epoch = (
                ResumableSampler(
                    len(self.train_frame), cfg.seed, cfg.batch_size, runtime.rank, runtime.world_size, cfg.grad_accum
                ).batches_per_epoch()
                // cfg.grad_accum
            )
            self.cfg = cfg = dataclasses.replace(cfg, epochs=math.ceil(cfg.steps / max(1, budget_epoch)))
        # look-alike batches and the tower warm-up left to their defaults resolve for these pairs and
        # this model; build_model's config write records what they resolved to, so a resume reads back
        # the same batches and tower
        self.cfg = cfg = dataclasses.replace(
            cfg,
            batch_clusters=cfg.resolved_batch_clusters(len(self.train_frame)),
            cluster_group=cfg.resolved_cluster_group(),
            tower_warmup=cfg.resolved_tower_warmup(self.model_cfg),
        )
        if cfg.batch_clusters > len(self.train_frame):  # refused before the model and its caches are built
            raise TpasError(
                f"--batch-clusters {cfg.batch_clusters} is more than the {len(self.train_frame)} training pairs; "
                "ask for fewer."
            )
        if len(self.train_frame) < self.per_step:
            raise TpasError(
                f"{cfg.data_root}: only {len(self.train_frame)} usable training pairs, fewer than one "
                f"optimizer step takes (--batch-size {cfg.batch_size} x {runtime.world_size} processes x "
                f"--grad-accum {cfg.grad_accum})."
            )
        if self.skipped:
            self.say(f"skipped {self.skipped} bad sample(s) (--on-bad-sample skip)")

    # ---- the model and its optimizer

    def build_model(self) -> None:
        cfg, runtime = self.cfg, self.runtime
        torch.manual_seed(cfg.seed)
        self.model = model = model_lib.build_model(self.model_cfg)
        if cfg.init is not None and self.checkpoint is None:
            # every rank loads (DDP would broadcast rank 0's anyway); only rank 0 reports
            with contextlib.nullcontext() if runtime.is_main else contextlib.redirect_stdout(io.StringIO()):
                report = load_init(model, cfg.init)
            self.say(f"init from {cfg.init}: {_describe_report(report)}")
        if runtime.is_main:  # on a resume too: a longer --epochs must survive the next resume
            self._write_config()
        if cfg.grad_checkpointing:
            try:
                model.set_grad_checkpointing(True)
            except NotImplementedError as exc:
                raise TpasError(f"--grad-checkpointing: {exc}; train without it.") from None
        model.to(runtime.device)
        if runtime.device.type == "cpu":  # a fifth of a lite step went to drawing dropout masks
            use_fast_dropout(model)
        transform = model_lib.image_transform(self.model_cfg, train=True)
        self.dataset = PairDataset(self.train_frame, cfg.data_root, transform, cfg.seed, cfg.pab_hard_negatives)
        self.collate = make_collate(self.text)
        self._warm_tower()
        self._cache_features()
        if cfg.image_cache != "none" and isinstance(self.dataset, PairDataset):
            self.dataset.cache = _image_cache(cfg, self.dataset, transform, self.run_dir, runtime)
        self.sampler = self._sampler()
        self.steps_per_epoch = self.sampler.batches_per_epoch() // cfg.grad_accum
        total_steps = cfg.steps or self.steps_per_epoch * cfg.epochs
        self._attach_word_head()
        self.optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay, cfg.lr, cfg.new_lr_mult), lr=cfg.lr)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: min(1.0, (step + 1) / warmup if warmup else 1.0) * max(0.0, 1.0 - step / max(1, total_steps)),
        )
        model.itm_pairs = cfg.itm_pairs or None  # 0: all
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)

    def _caption_ids(self) -> list[list[int]]:
        """Each training caption's token ids, exactly as the model reads them (padding dropped)."""
        tokens = self.text(self.train_frame["caption"].tolist())
        return [row[mask.bool()].tolist() for row, mask in zip(tokens["input_ids"], tokens["attention_mask"])]

    def _warm_tower(self) -> None:
        """--tower-warmup (tpas.train.warmup): fine-tune the locked tower on the captions' words before
        anything reads it. Rank 0 trains and saves it; every rank then loads that file, so all ranks,
        and a resume, cache the same tower."""
        cfg, runtime, model = self.cfg, self.runtime, self.model
        if not cfg.tower_warmup:
            return
        if not self.model_cfg.lock_image:
            raise TpasError(
                "--tower-warmup fine-tunes a locked image tower before it is cached; this model trains its tower "
                "anyway (--lock-image is off), so drop --tower-warmup."
            )
        path = self.run_dir / TOWER_WARMUP_FILE
        if runtime.is_main and (self.checkpoint is None or not path.is_file()):
            ids = self._caption_ids()
            vocab = word_vocab(ids, set(self.text.tokenizer.all_special_ids), WORD_MIN_CAPTIONS)
            by_image: dict[str, list[list[int]]] = {}
            for image, caption_ids in zip(self.train_frame["image"], ids):
                by_image.setdefault(image, []).append(caption_ids)
            report = warm_tower(
                model.image_encoder,
                list(by_image),
                word_targets(list(by_image.values()), vocab),
                cfg.data_root,
                self.model_cfg,
                runtime,
                epochs=cfg.tower_warmup,
                lr=cfg.tower_warmup_lr,
                seed=cfg.seed,
                progress=cfg.progress,
            )
            save_weights(model.image_encoder, path)
            self.warmup = {**dataclasses.asdict(report), "seconds": round(report.seconds, 1)}
            self.say(
                f"tower warm-up: {report.epochs} epoch(s) on {report.images} images naming {report.words} word pieces, "
                f"loss {report.first_loss:.4f} -> {report.last_loss:.4f} in {report.seconds:.0f} s"
            )
        runtime.barrier()
        load_weights(model.image_encoder, path)
        model.image_encoder.requires_grad_(False)
        model.image_encoder.eval()
        model.reset_tuned_blocks()

    def _attach_word_head(self) -> None:
        """--word-loss: a losses.WordHead on the image ITC feature, predicting the training captions'
        word pieces (those in at least WORD_MIN_CAPTIONS captions); seeded, and rebuilt identically on a
        resume from the same pairs. It trains with the new parameters and stays out of the final weights."""
        cfg, model = self.cfg, self.model
        if not cfg.word_loss:
            return
        ids = self._caption_ids()
        vocab = word_vocab(ids, set(self.text.tokenizer.all_special_ids), WORD_MIN_CAPTIONS)
        torch.manual_seed(stable_seed(cfg.seed, 23))
        model.attach_word_head(WordHead(self.model_cfg.embed_dim, vocab).to(self.runtime.device), cfg.word_loss)
        self.say(f"word loss: weight {cfg.word_loss}, {len(vocab)} word pieces predicted from each image's ITC feature")

    def _sampler(self) -> ResumableSampler:
        cfg, runtime = self.cfg, self.runtime
        ranks = {"rank": runtime.rank, "world_size": runtime.world_size, "grad_accum": cfg.grad_accum}
        captions = self.dataset.frame["caption"].tolist()
        clusters, group = cfg.batch_clusters, cfg.cluster_group  # resolved and checked in prepare_pairs
        if not clusters:
            return ResumableSampler(len(self.dataset), cfg.seed, cfg.batch_size, **ranks)
        labels = caption_clusters(captions, clusters, cfg.seed, cfg.cluster_by_colour)
        sizes = np.bincount(labels)
        colour = ", split by first colour word" if cfg.cluster_by_colour else ""
        self.say(
            f"batch clusters: {clusters} clusters of the training captions (median {int(np.median(sizes))} "
            f"pairs{colour}), batches of {cfg.batch_size // group} groups of {group}"
        )
        return ClusteredSampler(labels, group, cfg.seed, cfg.batch_size, **ranks)

    def _cache_features(self) -> None:
        """With a locked part and --feature-cache, serve its outputs from a FeatureCache (computed
        now, from the weights the run starts with: locked weights never change)."""
        cfg, model = self.cfg, self.model
        pairs = self.dataset
        paths = pairs.image_paths()
        captions = list(
            dict.fromkeys([*pairs.frame["caption"], *(pairs.frame["hard_c"] if pairs.hard_negatives else [])])
        )
        estimate = (
            features.estimate_bytes(
                model, len(paths), len(captions), self.model_cfg.max_tokens, self.model_cfg.image_size
            )
            if cfg.feature_cache == "auto" and any(model.cached_inputs())
            else 0
        )
        mode = features.resolve_mode(cfg.feature_cache, model, estimate)
        if mode == "none":
            if estimate:
                self.say(
                    f"--feature-cache auto: the cache would take about {estimate / 2**30:.1f} GiB, too much for this "
                    f"machine's memory; the locked parts run every step (--feature-cache memory forces it)"
                )
            return
        started = time.time()
        cache = features.build_feature_cache(
            model,
            paths if model.cached_inputs()[0] else [],
            captions,
            cfg.data_root,
            model_lib.image_transform(self.model_cfg, train=False),
            self.text,
            self.runtime,
            progress=cfg.progress and self.runtime.is_main,
        )
        self.dataset = features.CachedPairs(pairs, cache)
        self.collate = features.make_cached_collate(cache)
        self.say(
            f"cached the locked parts' outputs for {len(paths) if cache.images is not None else 0} images (x2 flips) "
            f"and {len(captions)} captions: {cache.nbytes() / 2**30:.2f} GiB in {time.time() - started:.0f} s"
        )

    def restore(self) -> None:
        """The checkpoint's weights, optimizer, schedule, scaler, RNG state and position."""
        runtime, checkpoint = self.runtime, self.checkpoint
        if checkpoint is None:
            if runtime.world_size > 1:  # DDP syncs the weights; dropout masks should differ between ranks
                torch.manual_seed(stable_seed(self.cfg.seed, runtime.rank, 17))
            return
        load_weights(self.model, checkpoint / "model.safetensors")
        state = _load_train_state(checkpoint / "train_state.pt")
        saved_world = state["position"].get("world_size", 1)
        if saved_world != runtime.world_size:
            raise TpasError(
                f"{checkpoint}: the run was trained by {saved_world} process(es); resume it with "
                f"torchrun --nproc_per_node {saved_world} (now {runtime.world_size})."
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng_ranks"][runtime.rank] if "rng_ranks" in state else state["rng"], runtime)
        self.position = state["position"]
        if (self.run_dir / "history.json").is_file():
            self.history = read_json(self.run_dir / "history.json")
        self.say(f"resuming {self.run_dir} at epoch {self.position['epoch'] + 1}, step {self.position['global_step']}")

    # ---- the epochs

    def _save(self) -> None:
        save_checkpoint(
            self.run_dir, self.model, self.optimizer, self.scheduler, self.position, self.scaler, self.runtime
        )

    def run(self) -> None:
        cfg, runtime = self.cfg, self.runtime
        self.say(
            f"training on {runtime.device} ({runtime.precision}), {runtime.world_size} process(es) x "
            f"{cfg.batch_size} pairs x {cfg.grad_accum} micro-batch(es) = {self.per_step} pairs per optimizer step, "
            f"{self.steps_per_epoch} steps per epoch"
        )
        net: torch.nn.Module = self.model
        if runtime.world_size > 1:
            net = DistributedDataParallel(
                self.model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
            )
        if cfg.compile:
            net = torch.compile(net)
        self.eval_transform = model_lib.image_transform(self.model_cfg, train=False)
        workers = auto_workers(cfg.workers, runtime.device)
        loader = make_loader(self.dataset, self.sampler, self.collate, workers, runtime, cfg.seed)
        self.model.train()
        for epoch in range(self.position["epoch"], cfg.epochs):
            stop, finished_epoch, losses = self._epoch(net, loader, epoch)
            if stop and not finished_epoch:
                self._save()
                break
            self._end_epoch(epoch, losses)
            if stop:
                break
        del loader  # ends the persistent workers

    def _epoch(self, net: torch.nn.Module, loader: Any, epoch: int) -> tuple[bool, bool, list[float]]:
        """One epoch's steps (from the resumed position); returns (stop: --max-steps reached,
        whether the epoch ran to its end or its step budget, the epoch's losses)."""
        cfg, position = self.cfg, self.position
        self.dataset.epoch = self.sampler.epoch = epoch
        start = position["step_in_epoch"] if epoch == position["epoch"] else 0
        self.sampler.skip_batches = start * cfg.grad_accum
        # Losses of steps before a mid-epoch resume come back from the checkpoint.
        losses = list(position.get("epoch_losses", [])) if epoch == position["epoch"] else []
        batches = iter(loader)
        bar = tqdm(
            range(start, self.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and self.runtime.is_main),
            dynamic_ncols=True,
        )
        step_in_epoch, stop = start, False
        for _ in bar:
            micro_batches = [next(batches) for _micro in range(cfg.grad_accum)]
            out = training_step(net, micro_batches, self.optimizer, self.scaler, self.runtime)
            self.scheduler.step()
            step_in_epoch += 1
            losses.append(out["loss"])
            self.position = {
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": self.position["global_step"] + 1,
                "world_size": self.runtime.world_size,
                "epoch_losses": losses,
            }
            bar.set_postfix(itc=f"{out['loss_itc']:.3f}", itm=f"{out['loss_itm']:.3f}", word=f"{out['loss_word']:.3f}")
            step = self.position["global_step"]
            if not math.isfinite(losses[-1]):
                raise TpasError(f"loss became {losses[-1]} at step {step}; lower --lr.")
            if cfg.steps and step >= cfg.steps:
                break  # the budget is spent: validate and save as at an epoch end
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stop = True
                break
            if cfg.save_every and step % cfg.save_every == 0 and step_in_epoch < self.steps_per_epoch:
                self._save()
        del batches
        return stop, not stop or step_in_epoch >= self.steps_per_epoch, losses

    def _end_epoch(self, epoch: int, losses: list[float]) -> None:
        """Validate (rank 0), record the history, checkpoint at the epoch boundary."""
        runtime = self.runtime
        self.position = {
            "epoch": epoch + 1,
            "step_in_epoch": 0,
            "global_step": self.position["global_step"],
            "world_size": runtime.world_size,
        }
        if runtime.is_main:
            metrics = (
                validate(
                    self.model, self.val_frame, self.cfg.data_root, self.eval_transform, self.text, runtime=runtime
                )
                if len(self.val_frame)
                else {}
            )
            self.history.append(
                {
                    "epoch": epoch + 1,
                    "step": self.position["global_step"],
                    "loss": float(np.mean(losses)) if losses else None,
                    "val_itc": metrics,
                }
            )
            write_json(self.run_dir / "history.json", self.history)
        runtime.barrier()  # the other ranks wait for rank 0's validation
        self._save()
        if runtime.is_main:
            last = self.history[-1]
            self.say(
                f"epoch {epoch + 1}: loss {last['loss']:.4f}  "
                f"val (ITC) {format_metrics(last['val_itc']) if last['val_itc'] else '-'}"
            )

    def finish(self) -> dict:
        runtime = self.runtime
        summary = {
            "run_dir": str(self.run_dir),
            "train_pairs": len(self.train_frame),
            "val_pairs": len(self.val_frame),
            "skipped": self.skipped,
            "steps": self.position["global_step"],
            "seconds": round(time.time() - self.started, 1),
            "val_itc": self.history[-1]["val_itc"] if self.history else None,
            "device": str(runtime.device),
            "precision": runtime.precision,
            "processes": runtime.world_size,
            "pairs_per_step": self.per_step,
        }
        if self.warmup is not None:
            summary["tower_warmup"] = self.warmup
        if runtime.is_main:
            save_weights(  # without the training-only parts: the run loads as its config.json says
                self.model,
                self.run_dir / "model.safetensors",
                {"global_step": str(self.position["global_step"])},
                exclude=self.model.TRAINING_ONLY_PREFIXES,
            )
            write_json(self.run_dir / "train_summary.json", summary)
        runtime.barrier()
        return summary


def _train(cfg: TrainConfig) -> dict:
    trainer = _Trainer(cfg)
    trainer.prepare_pairs()
    trainer.build_model()
    trainer.restore()
    trainer.run()
    return trainer.finish()


def _image_cache(
    cfg: TrainConfig, dataset: PairDataset, transform: Any, run_dir: Path, runtime: Runtime
) -> ResizedImages | None:
    resize = leading_resize(transform)
    if resize is None:
        if runtime.is_main:
            print(
                f"--image-cache {cfg.image_cache}: this model's transform does not start with a fixed-size Resize; not caching."
            )
        return None
    paths = dataset.image_paths()
    if cfg.image_cache == "memory":
        return build_image_cache(paths, cfg.data_root, resize, "memory", progress=cfg.progress and runtime.is_main)
    if runtime.is_main:  # disk: rank 0 writes it, the others map it
        build_image_cache(paths, cfg.data_root, resize, "disk", run_dir, progress=cfg.progress)
    runtime.barrier()
    return build_image_cache(paths, cfg.data_root, resize, "disk", run_dir, progress=False)
