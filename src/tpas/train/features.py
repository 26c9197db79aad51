"""Training on cached features: a locked part's output, computed once per image and caption.

A model whose image tower is locked (LiT, Zhai et al. 2022: `lock_image`) or whose bottom text
layers are (`lock_text_layers`) computes the same frozen function of the same inputs every
epoch. `build_feature_cache` runs those parts once, in eval mode, over every training image
(unflipped and flipped, the only augmentation a cache keeps) and every caption; `CachedPairs`
then serves batches of these features, and the model's trainable rest runs on them
(`RetrievalModel.forward(image_features=..., text_states=...)`). The cached tensors are what
`encode_image` / `encode_text` compute at inference, rounded to fp16 to halve the memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from tpas.data import load_rgb, resolve_image, stable_seed
from tpas.errors import TpasError
from tpas.models.text import TextPipeline
from tpas.runtime import Runtime
from tpas.train.data import PairDataset

CACHE_DTYPE = torch.float16
CACHE_MODES = ("auto", "memory", "none")
# auto caches when the estimate stays under this share of the machine's memory
AUTO_MEMORY_SHARE = 0.4


class FeatureCache:
    """image_features per (image, flip) and the captions' token ids, masks and locked-layer states."""

    def __init__(
        self,
        image_index: dict[str, int],
        images: torch.Tensor | None,
        caption_index: dict[str, int],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        states: torch.Tensor | None,
    ):
        self.image_index, self.images = image_index, images  # images [P, 2 (flip), ...]
        self.caption_index, self.input_ids, self.attention_mask = caption_index, input_ids, attention_mask
        self.states = states  # [K, L, D] or None (the text is encoded in full each step)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, self.states) if t is not None)


def machine_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_bytes(model: Any, images: int, captions: int, max_tokens: int, image_size: tuple[int, int]) -> int:
    """The cache's size for this many images (x2 flips) and captions, from one dummy forward."""
    cache_image, cache_text = model.cached_inputs()
    size = 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        if cache_image:
            size += 2 * images * model.image_features(torch.zeros(1, 3, *image_size, device=device)).numel()
        if cache_text:
            size += captions * max_tokens * model.text_encoder.config.hidden_size
    return size * torch.tensor([], dtype=CACHE_DTYPE).element_size()


def resolve_mode(requested: str, model: Any, estimate: int) -> str:
    """memory or none: auto caches when the model has a locked part and the cache fits comfortably."""
    if not any(model.cached_inputs()):
        if requested == "memory":
            raise TpasError(
                "--feature-cache memory needs a model with a locked part (--lock-image or --lock-text-layers); "
                "drop the flag or lock a part."
            )
        return "none"
    if requested != "auto":
        return requested
    total = machine_memory()
    return "memory" if total is None or estimate < AUTO_MEMORY_SHARE * total else "none"


@torch.inference_mode()
def build_feature_cache(
    model: Any,
    image_paths: list[str],
    captions: list[str],
    data_root: Path,
    transform: Any,
    text: TextPipeline,
    runtime: Runtime,
    batch_size: int = 64,
    progress: bool = True,
) -> FeatureCache:
    """Run the model's locked parts (eval mode, as at inference) over every image, plain and
    flipped (`transform` is the eval one), and over every caption."""
    cache_image, cache_text = model.cached_inputs()
    was_training = model.training
    model.eval()
    images = None
    if cache_image:
        chunks = []
        for start in tqdm(
            range(0, len(image_paths), batch_size),
            desc="caching image features",
            disable=not progress,
            leave=False,
        ):
            batch = torch.stack(
                [transform(load_rgb(resolve_image(data_root, p))) for p in image_paths[start : start + batch_size]]
            ).to(runtime.device)
            plain, flipped = model.image_features(batch), model.image_features(batch.flip(-1))
            chunks.append(torch.stack([plain, flipped], dim=1).to("cpu", CACHE_DTYPE))
        images = torch.cat(chunks)
    tokens = text(captions)
    input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
    text_states = None
    if cache_text:
        # batches of similar length, each padded only to its own longest (about 30% less compute
        # than batches in caption order); every row is written back to its caption's place. A
        # pipeline that pads to max_tokens keeps every position: its model reads the padding (CMP).
        order = torch.argsort(attention_mask.sum(1), stable=True)
        for start in range(0, len(captions), batch_size):
            rows = order[start : start + batch_size]
            length = input_ids.shape[1] if text.pad_to_max_tokens else int(attention_mask[rows].sum(1).max())
            states = model.text_states(
                input_ids[rows, :length].to(runtime.device), attention_mask[rows, :length].to(runtime.device)
            ).to("cpu", CACHE_DTYPE)
            if text_states is None:
                text_states = torch.zeros(*input_ids.shape, states.shape[-1], dtype=CACHE_DTYPE)
            text_states[rows, :length] = states
    model.train(was_training)
    return FeatureCache(
        {p: i for i, p in enumerate(image_paths)},
        images,
        {c: i for i, c in enumerate(captions)},
        input_ids,
        attention_mask,
        text_states,
    )


class CachedPairs(Dataset):
    """Training pairs served from a FeatureCache. Each (seed, epoch, index) picks the image's
    flip, so batches are the same whatever the workers and after a resume (as PairDataset).
    Items are row numbers into the cache; `collate` gathers the tensors."""

    def __init__(self, pairs: PairDataset, cache: FeatureCache):
        """pairs: the run's PairDataset, whose frame, seed and hard-negative setting these are, and which
        decodes and augments the images per step (its seeded transform) when they are not cached."""
        self.frame, self.seed, self.hard_negatives = pairs.frame, pairs.seed, pairs.hard_negatives
        self.cache, self.epoch = cache, 0
        self.pixels = pairs if cache.images is None else None
        self.image_rows = self.frame["image"].map(cache.image_index).tolist() if cache.images is not None else None
        self.caption_rows = self.frame["caption"].map(cache.caption_index).tolist()
        if self.hard_negatives:
            self.hard_caption_rows = self.frame["hard_c"].map(cache.caption_index).tolist()
            if cache.images is not None:
                self.hard_image_rows = self.frame["hard_i"].map(cache.image_index).tolist()

    def __len__(self) -> int:
        return len(self.frame)

    def _flip(self, sample_seed: int) -> int:
        return int(torch.randint(2, (), generator=torch.Generator().manual_seed(sample_seed)))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        sample_seed = stable_seed(self.seed, epoch, index)
        item: dict[str, Any] = {"index": index, "caption_row": self.caption_rows[index]}
        if self.image_rows is not None:
            item["image_row"] = (self.image_rows[index], self._flip(sample_seed))
        else:
            item["image"] = self.pixels._image(self.frame.at[index, "image"], sample_seed)
        if self.hard_negatives:
            item["hard_caption_row"] = self.hard_caption_rows[index]
            if self.image_rows is not None:
                item["hard_image_row"] = (self.hard_image_rows[index], self._flip(sample_seed + 1))
            else:
                item["hard_image"] = self.pixels._image(self.frame.at[index, "hard_i"], sample_seed + 1)
        return item


def make_cached_collate(cache: FeatureCache):
    """Batches of CachedPairs items: image_features (float32), the captions' ids and masks cut
    to the batch's longest, and their text_states when the text is cached."""

    def text(rows: list[int], prefix: str = "") -> dict[str, torch.Tensor]:
        index = torch.tensor(rows)
        mask = cache.attention_mask[index]
        length = int(mask.sum(1).max())
        out = {f"{prefix}input_ids": cache.input_ids[index, :length], f"{prefix}attention_mask": mask[:, :length]}
        if cache.states is not None:
            out[f"{prefix}text_states"] = cache.states[index, :length].float()
        return out

    def images(pairs: list[tuple[int, int]]) -> torch.Tensor:
        rows, flips = zip(*pairs)
        return cache.images[torch.tensor(rows), torch.tensor(flips)].float()

    def collate(items: list[dict]) -> dict:
        batch: dict[str, torch.Tensor] = {"index": torch.tensor([i["index"] for i in items])}
        batch.update(text([i["caption_row"] for i in items]))
        if "image_row" in items[0]:
            batch["image_features"] = images([i["image_row"] for i in items])
        else:
            batch["images"] = torch.stack([i["image"] for i in items])
        if "hard_caption_row" in items[0]:
            hard = text([i["hard_caption_row"] for i in items], "hard_")
            batch["hard_input_ids"], batch["hard_attention_mask"] = hard["hard_input_ids"], hard["hard_attention_mask"]
            if "hard_text_states" in hard:
                batch["hard_text_states"] = hard["hard_text_states"]
            if "hard_image_row" in items[0]:
                batch["hard_image_features"] = images([i["hard_image_row"] for i in items])
            else:
                batch["hard_images"] = torch.stack([i["hard_image"] for i in items])
        return batch

    return collate
