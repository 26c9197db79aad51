"""Fine-tuning: ITC + ITM on a seeded subset of the training pairs, with exact resume.

A run directory `runs/<name>/` holds:
- config.json: the resolved TrainConfig and ModelConfig (rebuilds the model);
- subset.json: the image_ids of the training subset and of the validation part;
- model.safetensors: the latest weights (what infer.py loads);
- checkpoint/: model.safetensors + train_state.pt (optimizer, schedule, RNG, position), swapped in
  as a whole so an interrupted save never leaves a mixed checkpoint;
- history.json: per-epoch loss and validation R@1/5/10, mAP, mINP (ITC ranking).

The same loop runs on a CPU or a GPU (`--device`, `--precision`) and on several GPUs with
`torchrun --nproc_per_node N train.py ...` (DDP): each of the N processes takes its own
`--batch-size` pairs of every global batch (a disjoint slice of the same seeded permutation), the
ITC/ITM negatives are gathered over all N (tpas.model), gradients are averaged, so one optimizer
step sees batch_size x N x grad_accum pairs. Only rank 0 writes files, validates and prints.
"""

# tpas.cli.field returns a dataclasses.field (it only adds the --help text), so RUF009 does not apply.
# ruff: noqa: RUF009

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import math
import os
import pickle
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from tqdm import tqdm

from tpas import distributed
from tpas import model as model_lib
from tpas.cli import field, given_fields
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
from tpas.io import atomic_path, read_json, write_json
from tpas.metrics import format_metrics, matrix_metrics
from tpas.text import CAPTION_CLEANERS, TextPipeline


@dataclass
class TrainConfig:
    data_root: Path = field(Path("data/demo"), "PAB data root (annotation/train/...); the default demo set is built when empty.")
    subset: int = field(10000, "Number of training pairs sampled (seeded, stratified normal/abnormal); 0 = all.")
    val_size: int = field(500, "Pairs held out for validation (whole source videos), disjoint from the subset.")
    seed: int = field(0, "Seed for subset, shuffling, augmentation and initialisation.")
    epochs: int = field(3, "Epochs over the subset (the paper uses 10 on a GPU; 3 fit the CPU demo).")
    steps: int | None = field(None, "Train for exactly this many optimizer steps instead of --epochs (the schedule decays over them; equal compute for any --subset).")
    batch_size: int = field(16, "Pairs per micro-batch on each process. In-batch ITC/ITM negatives come from the micro-batch of all processes together "
                                "(batch size x processes); an optimizer step sees batch size x processes x --grad-accum pairs.")
    # The paper's 3e-5 (x2 for new parameters) fine-tunes an X-VLM whose ITC/ITM heads were already
    # pre-trained; the lite preset's heads start random, and on the demo set 1e-4 (x5) reaches
    # val R@1 9.6 after 150 steps where 3e-5 (x2) reaches 1.6 (docs in README).
    lr: float = field(1e-4, "AdamW learning rate for pretrained parameters (paper: 3e-5 for a pre-trained X-VLM).")
    new_lr_mult: float = field(5.0, "Learning-rate multiplier for newly initialised parameters (paper: 2).")
    weight_decay: float = field(0.01, "AdamW weight decay (not on biases and norms).")
    model: str = field("lite", "Model preset: lite = EfficientNet-Lite0 + MiniLM-L6 (packaged weights); tiny / xvlm-tiny = random, for smoke tests; xvlm-base = Swin-B + BERT-base (weights via --init X-VLM checkpoint); blip-itm / clip = transformers models (--hf-model). See README, Presets.", choices=list(model_lib.PRESETS))
    hf_model: str | None = field(None, "blip-itm / clip presets: a local transformers model dir (or a hub name when online) to start from; default: the preset's hub name.")
    # The text pipeline (tpas.text): each defaults to the preset's, the reference model's own convention.
    caption_clean: str | None = field(None, "Caption cleaning before tokenization: pre_caption = X-VLM/CMP's (lower-case, "
                                            "punctuation deleted, first --max-words words), strip = whitespace only "
                                            "(default: the preset's: pre_caption for xvlm-* and cmp, strip for the others).",
                                      choices=list(CAPTION_CLEANERS))
    max_words: int | None = field(None, "Words pre_caption keeps (default: the preset's: 30 as in X-VLM's retrieval configs, 56 for cmp).")
    trailing_sep: bool | None = field(None, "End each caption with the tokenizer's [SEP] (default: the preset's: no for "
                                            "xvlm-*, whose X-VLM tokenizer emits [CLS] + words only; yes for the others).")
    max_tokens: int | None = field(None, "Maximum caption length in token ids, special tokens included (default: the "
                                         "preset's: 70 lite/tiny, 40 xvlm-*, 56 cmp, 35 blip-itm, 77 clip).")
    pad_to_max_tokens: bool | None = field(None, "Pad every caption to --max-tokens instead of the batch's longest "
                                                 "(default: the preset's: yes for cmp, whose text feature pools the "
                                                 "padded positions; no elsewhere, where padding changes nothing).")
    image_height: int | None = field(None, "Input image height (default: the preset's, 128 for lite).")
    image_width: int | None = field(None, "Input image width (default: the preset's, 64 for lite).")
    fusion_layers: int | None = field(None, "Cross-modal fusion layers, initialised from the text model's top layers (default: the preset's).")
    embed_dim: int | None = field(None, "ITC embedding size (default: the preset's).")
    init: Path | None = field(None, "Start from these weights (e.g. a pre-trained X-VLM checkpoint; see tpas.checkpoints) instead of the preset's; "
                                    "ignored with --resume, where the checkpoint wins.")
    pab_hard_negatives: bool = field(False, "Also use PAB's own hard_i/hard_c as extra ITM/ITC negatives.")
    on_bad_sample: str = field("fail", "What to do with a bad record or image: stop with a message, or skip it and count it.", choices=["fail", "skip"])
    device: str = field("auto", "Where to train: auto = the GPU when torch sees one (under torchrun, GPU LOCAL_RANK), else the CPU.",
                        choices=["auto", "cpu", "cuda"])
    precision: str = field("auto", "Arithmetic: auto = bf16 autocast on a GPU that supports it, else fp32; fp16 = autocast with loss scaling (GPU only).",
                           choices=["auto", "fp32", "bf16", "fp16"])
    grad_accum: int = field(1, "Micro-batches per optimizer step (gradients accumulated; in-batch negatives still come from one micro-batch). "
                               "The learning-rate schedule counts optimizer steps.")
    grad_checkpointing: bool = field(False, "Recompute activations in the backward pass: less memory for larger batches, at the cost of a second forward pass.")
    compile: bool = field(False, "torch.compile the model (GPU; the first steps are slow while it compiles).")
    workers: int = field(-1, "DataLoader worker processes (kept alive across epochs); -1 = auto: none when training "
                             "on a CPU with 2 cores or fewer (a worker takes a core from the model: docs/performance.md), "
                             "else 1 on a CPU, up to 8 on a GPU.")
    image_cache: str = field("none", "Decode each training image once, resized to the input size: memory = one uint8 array in RAM "
                                     "(H x W x 3 bytes per image), disk = the same memory-mapped under the run dir (reused on resume). "
                                     "Batches stay bit-identical.", choices=["none", "memory", "disk"])
    threads: int = field(0, "Torch CPU threads (0 = all cores).")
    runs_dir: Path = field(Path("runs"), "Where run directories are created.")
    name: str = field("demo", "Run name: outputs go to <runs-dir>/<name>/.")
    resume: bool = field(False, "Continue exactly from <runs-dir>/<name>/checkpoint/ (its saved config is used; --epochs may extend it).")
    save_every: int = field(200, "Also checkpoint every N optimizer steps (0 = only at epoch ends).")
    max_steps: int | None = field(None, "Stop after this many optimizer steps in total (smoke tests, benchmarks).")
    progress: bool = field(True, "Show progress bars.")

    def __post_init__(self) -> None:
        if self.grad_accum < 1:
            raise TpasError(f"--grad-accum must be at least 1; got {self.grad_accum}.")
        if self.batch_size < 1:
            raise TpasError(f"--batch-size must be at least 1; got {self.batch_size}.")
        # Each of these would otherwise run silently wrong: 0 epochs saves an untrained "trained" model,
        # a negative --val-size drops validation, a negative --subset fails deep inside sklearn.
        if self.epochs < 1:
            raise TpasError(f"--epochs must be at least 1; got {self.epochs}.")
        if self.steps is not None and self.steps < 1:
            raise TpasError(f"--steps must be at least 1 (or left out to train for --epochs); got {self.steps}.")
        if self.val_size < 0:
            raise TpasError(f"--val-size must be 0 (no validation) or more; got {self.val_size}.")
        if self.subset < 0:
            raise TpasError(f"--subset must be 0 (all pairs) or more; got {self.subset}.")
        if self.save_every < 0:
            raise TpasError(f"--save-every must be 0 (only at epoch ends) or more; got {self.save_every}.")


# How a resume treats this command's flags (tpas.cli.given_fields tells a given flag from a default):
# - how, not what, the run computes: this command's value, given or not;
RUNTIME_FIELDS = ("resume", "max_steps", "progress", "workers", "threads", "device", "compile",
                  "grad_checkpointing", "image_cache", "save_every")
# - where things are (the data may have moved; --init is superseded by the checkpoint): given ones
#   are used, with a note when they differ;
LOCATION_FIELDS = ("data_root", "runs_dir", "name", "init")
# - the length of the run: a given one extends (or shortens) it, with a note on the schedule;
SCHEDULE_FIELDS = ("epochs", "steps")
# - everything else is what the run is: the saved value; a given one that differs is refused.


# TrainConfig fields that only override the preset's ModelConfig (None = the preset's value); what
# they resolve to is saved in config.json's "model".
MODEL_FLAGS = (*model_lib.TEXT_FIELDS, "image_height", "image_width", "fusion_layers", "embed_dim", "hf_model")


def model_config_for(cfg: TrainConfig) -> model_lib.ModelConfig:
    # a flag overrides the preset only when given (None = not given)
    overrides: dict[str, Any] = {name: getattr(cfg, name) for name in model_lib.TEXT_FIELDS
                                 if getattr(cfg, name) is not None}
    base = model_lib.ModelConfig.from_preset(cfg.model)
    if cfg.image_height or cfg.image_width:
        overrides["image_size"] = (cfg.image_height or base.image_size[0], cfg.image_width or base.image_size[1])
    if cfg.fusion_layers is not None:
        overrides["fusion_layers"] = cfg.fusion_layers
    if cfg.embed_dim is not None:
        overrides["embed_dim"] = cfg.embed_dim
    if cfg.hf_model is not None:
        if base.family == "tpas":
            raise TpasError(f"--hf-model is for the blip-itm and clip presets; --model {cfg.model} does not read it.")
        overrides["hf_model"] = cfg.hf_model
    return model_lib.ModelConfig.from_preset(cfg.model, **overrides)


# ---------------------------------------------------------------- device, precision, processes

@dataclass
class Runtime:
    """Where and how steps run: the device, the autocast dtype (None = fp32) and this process's rank."""

    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Pick the device and autocast dtype; join the process group's rank when one is running."""
    if device == "cuda" and not torch.cuda.is_available():
        raise TpasError("--device cuda: torch sees no CUDA GPU (CPU-only torch build or no driver); use --device cpu.")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world = distributed.rank_and_world()
    target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if precision == "auto":
        amp = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else None
    elif precision == "fp16" and not use_cuda:
        raise TpasError("--precision fp16 needs a GPU (loss scaling is CUDA-only here); use bf16 or fp32 on the CPU.")
    else:
        amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if use_cuda:
        # TF32 matmuls/convolutions: ~fp32 accuracy at tensor-core speed on Ampere and later
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed image size: pick the fastest convolution once
    return Runtime(target, amp, rank, world)


def batch_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's keyword arguments from a collated batch, on `device`."""
    keys = ("images", "input_ids", "attention_mask", "hard_images", "hard_input_ids", "hard_attention_mask")
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


def training_step(net: torch.nn.Module, micro_batches: list[dict], optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, runtime: Runtime, timings: dict[str, float] | None = None) -> dict[str, float]:
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
        parts.append(torch.stack([out["loss"], out["loss_itc"], out["loss_itm"]]).detach().float())
    scaler.step(optimizer)
    scaler.update()
    lap("optimizer", clock)
    losses = torch.stack(parts).mean(0) if count > 1 else parts[0]
    if runtime.world_size > 1:  # each rank's loss covers its own rows: the mean is the global batch's
        dist.all_reduce(losses)
        losses = losses / runtime.world_size
    loss, itc, itm = losses.tolist()
    return {"loss": loss, "loss_itc": itc, "loss_itm": itm}


# ---------------------------------------------------------------- data

class ResizedImages:
    """Images decoded once and resized to the model's input size, in one uint8 array [N, H, W, 3]
    (in RAM, or a memory-mapped .npy). The transform's own Resize is then a no-op (torchvision
    returns an image already at the target size unchanged), so tensors are bit-identical to
    decoding on the fly; what is saved is the decode and the resize of every image every epoch.
    One array (not a dict of images) keeps it shared by forked DataLoader workers."""

    def __init__(self, paths: list[str], array: np.ndarray):
        self.index = {p: i for i, p in enumerate(paths)}
        self.array = array

    def __contains__(self, relative: str) -> bool:
        return relative in self.index

    def image(self, relative: str) -> Image.Image:
        return Image.fromarray(np.asarray(self.array[self.index[relative]]))


def leading_resize(transform: Any) -> T.Resize | None:
    """The Resize to a fixed (H, W) that starts `transform`, if it does (what a cache may apply)."""
    first = transform.transforms[0] if isinstance(transform, T.Compose) and transform.transforms else None
    if isinstance(first, T.Resize) and isinstance(first.size, (tuple, list)) and len(first.size) == 2:
        return first
    return None


def build_image_cache(paths: list[str], data_root: Path, resize: T.Resize, mode: str, folder: Path | None = None,
                      progress: bool = True, threads: int | None = None) -> ResizedImages:
    """Decode and resize `paths` (relative to data_root) into a ResizedImages. mode "disk" keeps
    the array in folder/image_cache.npy (+ .json naming its images) and reuses it when it fits."""
    height, width = resize.size
    key = {"size": [height, width], "interpolation": str(resize.interpolation), "images": paths}
    npy = (folder or Path(".")) / "image_cache.npy"
    reusable = mode == "disk" and npy.is_file() and npy.with_suffix(".json").is_file()
    if reusable and read_json(npy.with_suffix(".json")) == key:
        return ResizedImages(paths, np.load(npy, mmap_mode="r"))
    if mode == "disk":
        npy.parent.mkdir(parents=True, exist_ok=True)
        staging = npy.with_name(f".{npy.name}.tmp")
        array = np.lib.format.open_memmap(staging, mode="w+", dtype=np.uint8, shape=(len(paths), height, width, 3))
    else:
        array = np.empty((len(paths), height, width, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        array[i] = np.asarray(resize(load_rgb(resolve_image(data_root, paths[i]))))

    # PIL releases the GIL while decoding and resizing, so threads overlap
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for _ in tqdm(pool.map(decode, range(len(paths))), total=len(paths), desc="caching images",
                      disable=not progress, leave=False):
            pass
    if mode == "disk":
        array.flush()
        del array
        os.replace(staging, npy)
        write_json(npy.with_suffix(".json"), key)
        return ResizedImages(paths, np.load(npy, mmap_mode="r"))
    return ResizedImages(paths, array)


class PairDataset(Dataset):
    """Training pairs: image tensor, caption, and optionally PAB's hard negatives.

    Augmentation is seeded per (seed, epoch, index), so batches are identical whatever the
    number of workers and after a resume. The epoch comes with the index from the sampler
    ((epoch, index) keys), so workers that live across epochs see it.
    """

    def __init__(self, frame: pd.DataFrame, data_root: Path, transform: Any, seed: int, hard_negatives: bool = False,
                 cache: ResizedImages | None = None):
        self.frame = frame.reset_index(drop=True)
        self.root = Path(data_root)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self.hard_negatives = hard_negatives and self.frame["hard_i"].notna().all() and self.frame["hard_c"].notna().all()

    def __len__(self) -> int:
        return len(self.frame)

    def image_paths(self) -> list[str]:
        """Every image a sample may load (for a cache)."""
        columns = ["image", "hard_i"] if self.hard_negatives else ["image"]
        return list(dict.fromkeys(p for c in columns for p in self.frame[c]))

    def _image(self, relative: str, sample_seed: int) -> torch.Tensor:
        if self.cache is not None and relative in self.cache:
            image = self.cache.image(relative)
        else:
            image = load_rgb(resolve_image(self.root, relative))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.transform(image)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        row = self.frame.iloc[index]
        sample_seed = stable_seed(self.seed, epoch, index)
        item = {"image": self._image(row["image"], sample_seed), "caption": row["caption"], "index": index}
        if self.hard_negatives:
            item["hard_image"] = self._image(row["hard_i"], sample_seed + 1)
            item["hard_caption"] = row["hard_c"]
        return item


class ResumableSampler(Sampler[tuple[int, int]]):
    """A seeded permutation per epoch that can start part-way through (for exact resume).

    Yields (epoch, index) keys for PairDataset. With several processes, the permutation is cut
    into global micro-batches of batch_size x world_size, and rank r takes the r-th batch_size
    of each: the ranks' slices are disjoint and together equal one process's global batch.
    Only whole optimizer steps (grad_accum micro-batches) are yielded.
    """

    def __init__(self, size: int, seed: int, batch_size: int, rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        self.size, self.seed, self.batch_size = size, seed, batch_size
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.epoch, self.skip_batches = 0, 0  # skip_batches counts this rank's micro-batches

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(stable_seed(self.seed, self.epoch, 7))
        return torch.randperm(self.size, generator=generator).tolist()

    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch on each rank (a multiple of grad_accum)."""
        return self.size // (self.batch_size * self.world_size * self.grad_accum) * self.grad_accum

    def _mine(self) -> list[int]:
        order = torch.tensor(self.order()[:self.batches_per_epoch() * self.batch_size * self.world_size])
        return order.view(-1, self.world_size, self.batch_size)[:, self.rank].reshape(-1).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self._mine()[self.skip_batches * self.batch_size:]])

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip_batches) * self.batch_size


def make_collate(text: TextPipeline):
    def collate(items: list[dict]) -> dict:
        batch = {"images": torch.stack([i["image"] for i in items]), "index": torch.tensor([i["index"] for i in items])}
        batch.update(text([i["caption"] for i in items]))
        if "hard_image" in items[0]:
            batch["hard_images"] = torch.stack([i["hard_image"] for i in items])
            hard = text([i["hard_caption"] for i in items])
            batch["hard_input_ids"], batch["hard_attention_mask"] = hard["input_ids"], hard["attention_mask"]
        return batch
    return collate


def auto_workers(requested: int, device: torch.device, cpus: int | None = None) -> int:
    """--workers -1: on a GPU, loading runs beside the model (up to 8 workers, one core left for the
    main process); on a CPU, loading and the model share the cores, and at 2 cores a worker process
    slows the step more than it saves (11.3 vs 9.4 pairs/s measured), so none.
    cpus: the cores of this process; by default the machine's, shared by torchrun's local ranks."""
    if requested >= 0:
        return requested
    cpus = cpus or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device.type == "cuda":
        return max(1, min(8, cpus - 1))
    return 0 if cpus <= 2 else 1


def make_loader(dataset: PairDataset, sampler: ResumableSampler, collate: Any, workers: int, runtime: Runtime,
                seed: int, prefetch_factor: int | None = None) -> DataLoader:
    """One loader for the whole run: its workers persist across epochs (the sampler carries the epoch)."""
    extra = {"prefetch_factor": prefetch_factor} if workers and prefetch_factor else {}
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True, collate_fn=collate,
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=runtime.device.type == "cuda",
                      # its own generator: worker seeding must not consume the model's RNG stream
                      generator=torch.Generator().manual_seed(stable_seed(seed, 11)), **extra)


# ---------------------------------------------------------------- checkpoints

DIGEST_KEY = "tpas_sha256"  # safetensors metadata: a digest of every tensor, checked on load


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={**(metadata or {}), DIGEST_KEY: weights_digest(state)})


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load our own safetensors weights, refusing a file whose bytes changed since it was saved
    (safetensors itself only checks the header: flipped bytes load and give NaN scores)."""
    if not path.is_file():
        raise TpasError(f"{path}: no weights here; train first (python train.py) or check --run.")
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            recorded = (fh.metadata() or {}).get(DIGEST_KEY)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise TpasError(f"{path}: not a readable safetensors file ({exc}); re-train or restore it.") from None
    if recorded is not None and recorded != weights_digest(state):
        raise TpasError(f"{path}: the weights are corrupted (their checksum no longer matches the one saved with them); "
                        f"restore the file or re-train.")
    if recorded is None:  # saved before checksums: at least refuse what can only be damage
        bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise TpasError(f"{path}: tensor {bad} holds NaN or infinite values (a damaged file?); restore it or re-train.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TpasError(f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        f"use the config.json saved with them.")


def _rng_state(runtime: Runtime | None = None) -> dict:
    numpy_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}
    if runtime is not None and runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _set_rng_state(state: dict, runtime: Runtime | None = None) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and runtime is not None and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], runtime.device)


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, position: dict, scaler: torch.amp.GradScaler | None = None,
                    runtime: Runtime | None = None) -> None:
    """Write weights + training state into a fresh folder, then swap it in as a whole.

    Under DDP every rank must call it (each rank's RNG state is gathered); rank 0 writes."""
    runtime = runtime or Runtime()
    rng = _rng_state(runtime)
    rng_ranks = [rng]
    if runtime.world_size > 1:
        rng_ranks = [None] * runtime.world_size
        dist.all_gather_object(rng_ranks, rng)
    if not runtime.is_main:
        return
    staging, final, old = run_dir / ".checkpoint.tmp", run_dir / "checkpoint", run_dir / ".checkpoint.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_weights(model, staging / "model.safetensors", {"global_step": str(position["global_step"])})
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng, "position": position}
    if runtime.world_size > 1:
        state["rng_ranks"] = rng_ranks
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    torch.save(state, staging / "train_state.pt")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_train_state(path: Path) -> dict:
    """train_state.pt, read with weights_only=True: a file holding other objects is refused, never run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TpasError(f"{path}: not a tpas checkpoint (it holds objects other than tensors and plain values, which "
                        f"are never loaded); restore the run's checkpoint or start the run again.") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # torch's zip reader, truncated files
        raise TpasError(f"{path}: unreadable ({str(exc).splitlines()[0]}); the checkpoint is damaged: restore it "
                        f"or start the run again.") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "position"} <= set(state):
        raise TpasError(f"{path}: not a tpas checkpoint (no optimizer/scheduler/position); restore the run's checkpoint.")
    return state


def find_checkpoint(run_dir: Path) -> Path | None:
    for folder in (run_dir / "checkpoint", run_dir / ".checkpoint.old"):  # .old survives a crash mid-swap
        if (folder / "train_state.pt").is_file() and (folder / "model.safetensors").is_file():
            return folder
    return None


def load_run_model(run_dir: str | Path) -> tuple[model_lib.RetrievalModel, model_lib.ModelConfig]:
    """Rebuild a trained model from its run directory (config.json + model.safetensors)."""
    run_dir = Path(run_dir)
    saved = read_json(run_dir / "config.json")
    model_cfg = model_lib.ModelConfig.from_dict(saved["model"])
    # The weights come from the checkpoint, so skip loading the packaged pretrained ones.
    model_cfg = dataclasses.replace(model_cfg, image_pretrained=False, text_pretrained=False)
    model = model_lib.build_model(model_cfg)
    load_weights(model, run_dir / "model.safetensors")
    return model.eval(), model_cfg


def load_init(model: torch.nn.Module, path: Path) -> dict:
    """--init: start from the weights at `path` (tpas.checkpoints maps X-VLM/BLIP/... layouts)."""
    try:
        # imported here: only --init needs it (and it may pull in heavier dependencies)
        from tpas.checkpoints import load_initial_weights
    except ImportError as exc:
        raise TpasError(f"--init {path}: tpas.checkpoints is not available ({exc}); reinstall tpas.") from None
    return load_initial_weights(model, path)


def _describe_report(report: Any) -> str:
    """One line from load_initial_weights' report (its "counts", else whatever it holds)."""
    if not isinstance(report, dict):
        return str(report)
    if "summary" in report:
        return str(report["summary"])
    if isinstance(report.get("counts"), dict):
        counts = ", ".join(f"{v} {k}" for k, v in report["counts"].items())
        return f"{report.get('schema', '?')} names; tensors: {counts}"
    return ", ".join(f"{k} {len(v) if isinstance(v, (list, tuple, set, dict)) else v}" for k, v in report.items())


# ---------------------------------------------------------------- validation

@torch.inference_mode()
def validate(model: model_lib.RetrievalModel, frame: pd.DataFrame, data_root: Path, transform: Any, text: TextPipeline,
             batch_size: int = 64, runtime: Runtime | None = None) -> dict[str, float]:
    """ITC text→image retrieval over the held-out pairs (gallery = their distinct images)."""
    runtime = runtime or Runtime()
    model.eval()
    images = list(dict.fromkeys(frame["image"]))
    column = {image: i for i, image in enumerate(images)}
    image_feats, text_feats = [], []
    with runtime.autocast():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(load_rgb(resolve_image(data_root, p))) for p in images[start:start + batch_size]])
            image_feats.append(model.encode_image(batch.to(runtime.device))[1].float())
        captions = frame["caption"].tolist()
        for start in range(0, len(captions), batch_size):
            tokens = text(captions[start:start + batch_size])
            text_feats.append(model.encode_text(tokens["input_ids"].to(runtime.device),
                                                tokens["attention_mask"].to(runtime.device))[1].float())
    scores = (torch.cat(text_feats) @ torch.cat(image_feats).T).cpu().numpy()
    model.train()
    return matrix_metrics(scores, [column[p] for p in frame["image"]])


# ---------------------------------------------------------------- the loop

def _prepare_data(cfg: TrainConfig, run_dir: Path, resumed: dict | None) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    frame, problems = load_train_annotations(cfg.data_root, cfg.on_bad_sample)
    if resumed is not None:  # the exact pairs of the original run, whatever the data dir holds now
        by_id = frame.set_index("image_id", drop=False)
        missing = [i for i in resumed["train"] + resumed["val"] if i not in by_id.index]
        if missing:
            raise TpasError(f"{run_dir / 'subset.json'}: {len(missing)} saved image_ids (e.g. {missing[0]}) are not in "
                            f"{cfg.data_root}; resume with the data the run started with.")
        return by_id.loc[resumed["train"]].reset_index(drop=True), by_id.loc[resumed["val"]].reset_index(drop=True), len(problems)
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
            notes.append(f"--{name} {mine} given: the run was started with {theirs}, and its learning-rate schedule now "
                         f"decays over the new length, so it will not match a run started with --{name} {mine}")
            setattr(merged, name, mine)
            if name == "epochs" and "steps" not in given:
                merged.steps = None  # --epochs replaces a saved step budget
        else:
            refused.append(f"--{name.replace('_', '-')} {mine} (saved: {theirs})")
    if refused:
        raise TpasError(f"{run_dir}: --resume continues the run as it was started, but {', '.join(refused)} would change "
                        f"it; drop {'that flag' if len(refused) == 1 else 'those flags'}, or start a new run with --name.")
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
    started_group = distributed.init_from_env("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                                              else "cpu")
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


def _train(cfg: TrainConfig) -> dict:
    given = given_fields(cfg)
    run_dir = Path(cfg.runs_dir) / cfg.name
    started_before = (run_dir / "config.json").is_file()
    checkpoint = find_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and not started_before:
        raise TpasError(f"{run_dir}: no run to resume here; drop --resume to start a new run.")
    if not cfg.resume and started_before:
        raise TpasError(f"{run_dir}: a run with this name exists; pass --resume to continue it (a run that stopped "
                        f"before its first checkpoint starts again) or --name for a new one.")
    notes: list[str] = []
    saved_model = None
    if cfg.resume:
        cfg, notes = _resolved_config(cfg, run_dir, given)
        # the model (and its text pipeline) is what the run was built with, whatever the preset says today
        saved_model = model_lib.ModelConfig.from_dict(read_json(run_dir / "config.json")["model"])
    resumed_subset = read_json(run_dir / "subset.json") if checkpoint is not None else None
    runtime = resolve_runtime(cfg.device, cfg.precision)
    say = print if runtime.is_main else (lambda *args, **kwargs: None)
    for note in notes:
        say(f"note: {note}")
    if cfg.resume and checkpoint is None:
        say(f"{run_dir}: stopped before its first checkpoint; starting it again from step 0 with its saved settings")
        if runtime.is_main:
            _clear_run(run_dir)
    runtime.barrier()  # every rank has seen the run dir as it was before rank 0 writes into it
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    if runtime.is_main and checkpoint is None:
        # first of all: a run killed at any point after this can be started again by --resume
        write_json(run_dir / "config.json", {"train": cfg, "model": dataclasses.asdict(saved_model or model_config_for(cfg))})
    if runtime.is_main:
        ensure_data(cfg.data_root, cfg.seed)
        train_frame, val_frame, skipped = _prepare_data(cfg, run_dir, resumed_subset)
        if checkpoint is None:
            write_json(run_dir / "subset.json", {"seed": cfg.seed, "train": train_frame["image_id"].tolist(),
                                                 "val": val_frame["image_id"].tolist()})
    runtime.barrier()
    if not runtime.is_main:  # the pairs rank 0 chose (and checked)
        train_frame, val_frame, skipped = _prepare_data(cfg, run_dir, read_json(run_dir / "subset.json"))
    per_step = cfg.batch_size * runtime.world_size * cfg.grad_accum
    model_cfg = saved_model or model_config_for(cfg)
    text = model_lib.build_text_pipeline(model_cfg)
    train_frame, bad_train = _readable_captions(train_frame, text, cfg)
    val_frame, bad_val = _readable_captions(val_frame, text, cfg)
    skipped += bad_train + bad_val
    if cfg.steps:  # a step budget: enough epochs to hold it, the last one cut short
        budget_epoch = ResumableSampler(len(train_frame), cfg.seed, cfg.batch_size, runtime.rank, runtime.world_size,
                                           cfg.grad_accum).batches_per_epoch() // cfg.grad_accum
        cfg = dataclasses.replace(cfg, epochs=math.ceil(cfg.steps / max(1, budget_epoch)))
    if len(train_frame) < per_step:
        raise TpasError(f"{cfg.data_root}: only {len(train_frame)} usable training pairs, fewer than one optimizer step takes "
                        f"(--batch-size {cfg.batch_size} x {runtime.world_size} processes x --grad-accum {cfg.grad_accum}).")
    if skipped:
        say(f"skipped {skipped} bad sample(s) (--on-bad-sample skip)")

    torch.manual_seed(cfg.seed)
    model = model_lib.build_model(model_cfg)
    if cfg.init is not None and checkpoint is None:
        # every rank loads (DDP would broadcast rank 0's anyway); only rank 0 reports
        with contextlib.nullcontext() if runtime.is_main else contextlib.redirect_stdout(io.StringIO()):
            report = load_init(model, cfg.init)
        say(f"init from {cfg.init}: {_describe_report(report)}")
    if runtime.is_main:  # on a resume too: a longer --epochs must survive the next resume
        write_json(run_dir / "config.json", {"train": cfg, "model": dataclasses.asdict(model_cfg)})
    if cfg.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except NotImplementedError as exc:
            raise TpasError(f"--grad-checkpointing: {exc}; train without it.") from None

    transform = model_lib.image_transform(model_cfg, train=True)
    dataset = PairDataset(train_frame, cfg.data_root, transform, cfg.seed, cfg.pab_hard_negatives)
    if cfg.image_cache != "none":
        dataset.cache = _image_cache(cfg, dataset, transform, run_dir, runtime)
    sampler = ResumableSampler(len(dataset), cfg.seed, cfg.batch_size, runtime.rank, runtime.world_size, cfg.grad_accum)
    steps_per_epoch = sampler.batches_per_epoch() // cfg.grad_accum
    total_steps = cfg.steps or steps_per_epoch * cfg.epochs
    model.to(runtime.device)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay, cfg.lr, cfg.new_lr_mult), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(1, total_steps)))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    history: list[dict] = []
    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "world_size": runtime.world_size}
    if checkpoint is not None:
        load_weights(model, checkpoint / "model.safetensors")
        state = _load_train_state(checkpoint / "train_state.pt")
        saved_world = state["position"].get("world_size", 1)
        if saved_world != runtime.world_size:
            raise TpasError(f"{checkpoint}: the run was trained by {saved_world} process(es); resume it with "
                            f"torchrun --nproc_per_node {saved_world} (now {runtime.world_size}).")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng_ranks"][runtime.rank] if "rng_ranks" in state else state["rng"], runtime)
        position = state["position"]
        if (run_dir / "history.json").is_file():
            history = read_json(run_dir / "history.json")
        say(f"resuming {run_dir} at epoch {position['epoch'] + 1}, step {position['global_step']}")
    elif runtime.world_size > 1:  # DDP syncs the weights; dropout masks should differ between ranks
        torch.manual_seed(stable_seed(cfg.seed, runtime.rank, 17))
    say(f"training on {runtime.device} ({runtime.precision}), {runtime.world_size} process(es) x {cfg.batch_size} pairs"
        f" x {cfg.grad_accum} micro-batch(es) = {per_step} pairs per optimizer step, {steps_per_epoch} steps per epoch")

    net: torch.nn.Module = model
    if runtime.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    eval_transform = model_lib.image_transform(model_cfg, train=False)
    workers = auto_workers(cfg.workers, runtime.device)
    loader = make_loader(dataset, sampler, make_collate(text), workers, runtime, cfg.seed)
    model.train()
    stop = False
    for epoch in range(position["epoch"], cfg.epochs):
        dataset.epoch = sampler.epoch = epoch
        start = position["step_in_epoch"] if epoch == position["epoch"] else 0
        sampler.skip_batches = start * cfg.grad_accum
        # Losses of steps before a mid-epoch resume come back from the checkpoint.
        losses = list(position.get("epoch_losses", [])) if epoch == position["epoch"] else []
        batches = iter(loader)
        bar = tqdm(range(start, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and runtime.is_main), dynamic_ncols=True)
        step_in_epoch = start
        for _ in bar:
            micro_batches = [next(batches) for _micro in range(cfg.grad_accum)]
            out = training_step(net, micro_batches, optimizer, scaler, runtime)
            scheduler.step()
            step_in_epoch += 1
            losses.append(out["loss"])
            position = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": position["global_step"] + 1,
                        "world_size": runtime.world_size, "epoch_losses": losses}
            bar.set_postfix(itc=f"{out['loss_itc']:.3f}", itm=f"{out['loss_itm']:.3f}")
            if not math.isfinite(losses[-1]):
                raise TpasError(f"loss became {losses[-1]} at step {position['global_step']}; lower --lr.")
            if cfg.steps and position["global_step"] >= cfg.steps:
                break  # the budget is spent: validate and save as at an epoch end
            if cfg.max_steps is not None and position["global_step"] >= cfg.max_steps:
                stop = True
                break
            if cfg.save_every and position["global_step"] % cfg.save_every == 0 and step_in_epoch < steps_per_epoch:
                save_checkpoint(run_dir, model, optimizer, scheduler, position, scaler, runtime)
        del batches
        if stop and step_in_epoch < steps_per_epoch:
            save_checkpoint(run_dir, model, optimizer, scheduler, position, scaler, runtime)
            break
        position = {"epoch": epoch + 1, "step_in_epoch": 0, "global_step": position["global_step"],
                    "world_size": runtime.world_size}
        if runtime.is_main:
            metrics = validate(model, val_frame, cfg.data_root, eval_transform, text,
                               runtime=runtime) if len(val_frame) else {}
            history.append({"epoch": epoch + 1, "step": position["global_step"],
                            "loss": float(np.mean(losses)) if losses else None, "val_itc": metrics})
            write_json(run_dir / "history.json", history)
        runtime.barrier()  # the other ranks wait for rank 0's validation
        save_checkpoint(run_dir, model, optimizer, scheduler, position, scaler, runtime)
        if runtime.is_main:
            say(f"epoch {epoch + 1}: loss {history[-1]['loss']:.4f}  "
                f"val (ITC) {format_metrics(history[-1]['val_itc']) if history[-1]['val_itc'] else '-'}")
        if stop:
            break
    del loader  # ends the persistent workers
    summary = {"run_dir": str(run_dir), "train_pairs": len(train_frame), "val_pairs": len(val_frame),
               "skipped": skipped, "steps": position["global_step"], "seconds": round(time.time() - started, 1),
               "val_itc": history[-1]["val_itc"] if history else None, "device": str(runtime.device),
               "precision": runtime.precision, "processes": runtime.world_size, "pairs_per_step": per_step}
    if runtime.is_main:
        save_weights(model, run_dir / "model.safetensors", {"global_step": str(position["global_step"])})
        write_json(run_dir / "train_summary.json", summary)
    runtime.barrier()
    return summary


def _image_cache(cfg: TrainConfig, dataset: PairDataset, transform: Any, run_dir: Path, runtime: Runtime) -> ResizedImages | None:
    resize = leading_resize(transform)
    if resize is None:
        if runtime.is_main:
            print(f"--image-cache {cfg.image_cache}: this model's transform does not start with a fixed-size Resize; not caching.")
        return None
    paths = dataset.image_paths()
    if cfg.image_cache == "memory":
        return build_image_cache(paths, cfg.data_root, resize, "memory", progress=cfg.progress and runtime.is_main)
    if runtime.is_main:  # disk: rank 0 writes it, the others map it
        build_image_cache(paths, cfg.data_root, resize, "disk", run_dir, progress=cfg.progress)
    runtime.barrier()
    return build_image_cache(paths, cfg.data_root, resize, "disk", run_dir, progress=False)
