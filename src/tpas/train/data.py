"""Training data: the pair dataset, the resumable seeded sampler, collation through the model's
text pipeline, DataLoaders, and the optional decoded-image cache."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from tqdm import tqdm

from tpas.data import (
    load_rgb,
    resolve_image,
    stable_seed,
)
from tpas.io import read_json, write_json
from tpas.models.text import TextPipeline
from tpas.runtime import Runtime


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


def build_image_cache(
    paths: list[str],
    data_root: Path,
    resize: T.Resize,
    mode: str,
    folder: Path | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> ResizedImages:
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
        for _ in tqdm(
            pool.map(decode, range(len(paths))),
            total=len(paths),
            desc="caching images",
            disable=not progress,
            leave=False,
        ):
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

    def __init__(
        self,
        frame: pd.DataFrame,
        data_root: Path,
        transform: Any,
        seed: int,
        hard_negatives: bool = False,
        cache: ResizedImages | None = None,
    ):
        self.frame = frame.reset_index(drop=True)
        self.root = Path(data_root)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self.hard_negatives = (
            hard_negatives and self.frame["hard_i"].notna().all() and self.frame["hard_c"].notna().all()
        )

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
        order = torch.tensor(self.order()[: self.batches_per_epoch() * self.batch_size * self.world_size])
        return order.view(-1, self.world_size, self.batch_size)[:, self.rank].reshape(-1).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self._mine()[self.skip_batches * self.batch_size :]])

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip_batches) * self.batch_size


# Plain English colour terms (clothing and hair), for --cluster-by-colour.
COLOUR_WORDS = frozenset(
    "black white grey gray silver red maroon burgundy crimson pink magenta purple violet lilac lavender blue navy "
    "teal turquoise cyan green olive lime khaki yellow gold golden beige cream tan orange coral brown blonde blond "
    "ginger auburn".split()
)
_COLOUR_WORD = re.compile(r"\b(" + "|".join(sorted(COLOUR_WORDS)) + r")\b", re.IGNORECASE)


def first_colour_word(caption: str) -> str:
    """The first colour word a caption names, lower-cased ("" if none): in person captions, usually the
    upper garment's colour, which is named first."""
    match = _COLOUR_WORD.search(caption)
    return match.group(1).lower() if match else ""


def caption_clusters(captions: list[str], k: int, seed: int, by_colour: bool = False) -> np.ndarray:
    """A cluster label per caption: k-means (k clusters) on the captions' TF-IDF vectors, seeded.

    Captions that share most of their words (action, colours, garments) land together, so a batch
    drawn from a few clusters holds look-alike pairs as each other's in-batch negatives. by_colour
    splits each cluster by the caption's first colour word: a group then shares the wording (mostly
    the action) and the first-named garment's colour, so its negatives differ in the garment types,
    the gender and the rest, the details the model misreads (docs/demo-quality.md)."""
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectors = TfidfVectorizer(stop_words="english", sublinear_tf=True).fit_transform(captions)
    labels = KMeans(n_clusters=k, n_init=1, random_state=seed % 2**32).fit_predict(vectors)
    if not by_colour:
        return labels
    keys = [f"{label} {first_colour_word(c)}" for label, c in zip(labels, captions, strict=True)]
    return np.unique(keys, return_inverse=True)[1].astype(np.int64)


class ClusteredSampler(ResumableSampler):
    """ResumableSampler whose batches are look-alike groups (TAS-B style, Hofstaetter et al. 2021):
    each epoch, every cluster's pairs are shuffled and cut into groups of `group`; the whole groups
    are shuffled, so each batch is batch_size / group groups, mostly from different clusters. The
    clusters' remainders are pooled, shuffled and cut into groups too; only the last group can be
    short, and it comes last, so every batch is whole groups. Each pair still comes once an epoch."""

    def __init__(self, labels: np.ndarray, group: int, seed: int, batch_size: int, **kwargs: int):
        super().__init__(len(labels), seed, batch_size, **kwargs)
        self.labels, self.group = np.asarray(labels), group

    def order(self) -> list[int]:
        rng = np.random.default_rng(stable_seed(self.seed, self.epoch, 0xC1))
        groups, rest = [], []
        for label in np.unique(self.labels):
            cut, left = self._whole_groups(rng.permutation(np.flatnonzero(self.labels == label)))
            groups += cut
            rest.append(left)
        cut, short = self._whole_groups(rng.permutation(np.concatenate(rest)))
        groups += cut
        order = [groups[i] for i in rng.permutation(len(groups))] + [short]
        return np.concatenate(order).astype(np.int64).tolist()

    def _whole_groups(self, members: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """`members` cut into whole groups, and what is left over (fewer than a group)."""
        whole = len(members) // self.group * self.group
        return [members[i : i + self.group] for i in range(0, whole, self.group)], members[whole:]


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


def make_loader(
    dataset: PairDataset,
    sampler: ResumableSampler,
    collate: Any,
    workers: int,
    runtime: Runtime,
    seed: int,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """One loader for the whole run: its workers persist across epochs (the sampler carries the epoch)."""
    extra = {"prefetch_factor": prefetch_factor} if workers and prefetch_factor else {}
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=runtime.device.type == "cuda",
        # its own generator: worker seeding must not consume the model's RNG stream
        generator=torch.Generator().manual_seed(stable_seed(seed, 11)),
        **extra,
    )
