"""`TrainConfig` (train.py's flags) and how it resolves to the run's `ModelConfig`."""

# tpas.cli.field returns a dataclasses.field (it only adds the --help text), so RUF009 does not apply.
# ruff: noqa: RUF009

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpas import models as model_lib
from tpas.cli import field
from tpas.errors import TpasError
from tpas.models.text import CAPTION_CLEANERS

# --tower-warmup's default for the lite preset's locked tower: 6 epochs read better on the demo, but
# 3 keep the default run inside 20 minutes on 2 cores (docs/demo-quality.md, thirteenth session)
LITE_TOWER_WARMUP = 3


@dataclass
class TrainConfig:
    data_root: Path = field(
        Path("data/demo"), "PAB data root (annotation/train/...); the default demo set is built when empty."
    )
    subset: int = field(10000, "Number of training pairs sampled (seeded, stratified normal/abnormal); 0 = all.")
    val_size: int = field(500, "Pairs held out for validation (whole source videos), disjoint from the subset.")
    seed: int = field(0, "Seed for subset, shuffling, augmentation and initialisation.")
    epochs: int = field(
        7,
        "Epochs over the subset (the paper uses 10 on a GPU; 7 fit the lite CPU demo in 16 min with bf16 on AMX, 2 cores, not counting the --tower-warmup stage).",
    )
    steps: int | None = field(
        None,
        "Train for exactly this many optimizer steps instead of --epochs (the schedule decays over them; equal compute for any --subset).",
    )
    batch_size: int = field(
        128,
        "Pairs per micro-batch on each process. In-batch ITC/ITM negatives come from the micro-batch of all processes together "
        "(batch size x processes); an optimizer step sees batch size x processes x --grad-accum pairs.",
    )
    # The paper's 3e-5 (x2 for new parameters) fine-tunes an X-VLM whose ITC/ITM heads were already
    # pre-trained; the lite preset's heads start random, and on the demo set 1e-4 (x5) reaches
    # val R@1 9.6 after 150 steps where 3e-5 (x2) reaches 1.6 (docs in README).
    lr: float = field(1e-4, "AdamW learning rate for pretrained parameters (paper: 3e-5 for a pre-trained X-VLM).")
    new_lr_mult: float = field(5.0, "Learning-rate multiplier for newly initialised parameters (paper: 2).")
    weight_decay: float = field(0.01, "AdamW weight decay (not on biases and norms).")
    model: str = field(
        "lite",
        "Model preset: lite = EfficientNet-Lite0 + MiniLM-L6 (packaged weights); tiny / xvlm-tiny = random, for smoke tests; xvlm-base = Swin-B + BERT-base (weights via --init X-VLM checkpoint); blip-itm / clip = transformers models (--hf-model). See README, Presets.",
        choices=list(model_lib.PRESETS),
    )
    hf_model: str | None = field(
        None,
        "blip-itm / clip presets: a local transformers model dir (or a hub name when online) to start from; default: the preset's hub name.",
    )
    # The text pipeline (tpas.models.text): each defaults to the preset's, the reference model's own convention.
    caption_clean: str | None = field(
        None,
        "Caption cleaning before tokenization: pre_caption = X-VLM/CMP's (lower-case, "
        "punctuation deleted, first --max-words words), strip = whitespace only "
        "(default: the preset's: pre_caption for xvlm-* and cmp, strip for the others).",
        choices=list(CAPTION_CLEANERS),
    )
    max_words: int | None = field(
        None, "Words pre_caption keeps (default: the preset's: 30 as in X-VLM's retrieval configs, 56 for cmp)."
    )
    trailing_sep: bool | None = field(
        None,
        "End each caption with the tokenizer's [SEP] (default: the preset's: no for "
        "xvlm-*, whose X-VLM tokenizer emits [CLS] + words only; yes for the others).",
    )
    max_tokens: int | None = field(
        None,
        "Maximum caption length in token ids, special tokens included (default: the "
        "preset's: 70 lite/tiny, 40 xvlm-*, 56 cmp, 35 blip-itm, 77 clip).",
    )
    pad_to_max_tokens: bool | None = field(
        None,
        "Pad every caption to --max-tokens instead of the batch's longest "
        "(default: the preset's: yes for cmp, whose text feature pools the "
        "padded positions; no elsewhere, where padding changes nothing).",
    )
    image_height: int | None = field(None, "Input image height (default: the preset's, 128 for lite).")
    image_width: int | None = field(None, "Input image width (default: the preset's, 64 for lite).")
    image_stage: int | None = field(
        None,
        "Take the image tokens from this stage of the CNN instead of its final map (lite: 4 = 112 channels at "
        "stride 16, 8x4 = 32 tokens instead of 4x2 = 8; an ablation for issue 13, docs/demo-quality.md).",
    )
    image_tokens: str | None = field(
        None,
        "How the CNN's maps become image tokens: projected = its final map, one token per cell; pyramid = "
        "--image-stages resized to the --image-grid-rows x --image-grid-cols grid and concatenated per cell (colour from the early stages, "
        "action from the last); direct = a Swin's tokens as they are (xvlm-*, cmp). Default: the preset's.",
        choices=list(model_lib.IMAGE_TOKEN_MODES),
    )
    image_stages: list[int] = field(
        [],
        "pyramid tokens: the CNN blocks read (repeat the flag; -1 = the final 1280-channel map). Default: the preset's "
        "(lite: 2 4 -1, i.e. 40 channels at stride 8, 112 at stride 16 and the final map).",
    )
    image_grid_rows: int | None = field(None, "pyramid tokens: rows of the token grid (default: the preset's, lite 8).")
    image_grid_cols: int | None = field(
        None, "pyramid tokens: columns of the token grid (default: the preset's, lite 4)."
    )
    image_layers: int | None = field(
        None,
        "New self-attention layers over the image tokens before the ITC feature (pyramid tokens; default: the preset's).",
    )
    pixel_stem: int | None = field(
        None,
        "pyramid tokens: base width of a small CNN trained from scratch on the raw pixels (7 conv blocks, stride 16, "
        "8x this many channels out), read beside each cell's frozen features; it sees the few-pixel garment details "
        "an ImageNet tower misses at 128x64. 0 = none. Default: the preset's.",
    )
    tune_from: int | None = field(
        None,
        "pyramid tokens with a locked tower: the stages read from blocks >= N come from a trained copy of those blocks "
        "(BatchNorm statistics frozen), run on block N-1's output, which --feature-cache keeps beside the frozen features; "
        "the pretrained mid-level filters then adapt to garment details. 0 = the whole tower stays frozen. Default: the preset's.",
    )
    lock_image: bool | None = field(
        None,
        "Freeze the pretrained image backbone (LiT): its BatchNorm stays in eval mode and, with --feature-cache, its "
        "output is computed once per image. Default: the preset's.",
    )
    lock_text_layers: int | None = field(
        None,
        "Freeze the text embeddings and this many bottom text layers (their states are cached with --feature-cache; "
        "the layers above and the fusion layers train). Default: the preset's.",
    )
    fusion_layers: int | None = field(
        None, "Cross-modal fusion layers, initialised from the text model's top layers (default: the preset's)."
    )
    embed_dim: int | None = field(None, "ITC embedding size (default: the preset's).")
    init: Path | None = field(
        None,
        "Start from these weights (e.g. a pre-trained X-VLM checkpoint; see tpas.models.convert.xvlm) instead of the preset's; "
        "ignored with --resume, where the checkpoint wins.",
    )
    itm_pairs: int = field(
        32,
        "ITM loss on only this many pairs of each micro-batch (their negatives still come from the whole batch); "
        "the fusion encoder's cost falls in proportion, while ITC keeps every in-batch negative (0 = all pairs).",
    )
    warmup_steps: int = field(50, "Linear learning-rate warm-up over this many optimizer steps, then linear decay.")
    pab_hard_negatives: bool = field(
        True,
        "Also use PAB's own hard_i/hard_c (a near-twin image and caption per pair) as extra ITC/ITM negatives "
        "(on the previous lite recipe, demo val R@1 34.4 against 27.2 without: docs/demo-quality.md).",
    )
    swap_negatives: float = field(
        0.0,
        "Share of the training pairs whose hard negative caption (hard_c) becomes the caption itself with one garment "
        "type or the gender swapped (NegCLIP-style, tpas.train.swaps): a negative that differs in exactly the detail "
        "a model misreads. Needs --pab-hard-negatives; 0 = PAB's own hard_c throughout.",
    )
    batch_clusters: int | None = field(
        None,
        "Batches of look-alike pairs (TAS-B-style, tpas.train.data.ClusteredSampler): the training captions fall into "
        "this many k-means clusters of their TF-IDF vectors, and each batch is whole groups of --cluster-group pairs, "
        "each group from one cluster, so in-batch negatives share most of their words. Default: one cluster per 100 "
        "training pairs, at most 100, none under 100 pairs (100 for a 10k subset: docs/demo-quality.md); "
        "0 = uniformly random batches (the paper's recipe).",
    )
    cluster_group: int | None = field(
        None,
        "Pairs drawn together from one cluster with --batch-clusters; must divide --batch-size. "
        "Default: a quarter of the batch (32 of 128), or 1 when the batch size is not a multiple of 4.",
    )
    cluster_by_colour: bool = field(
        False,
        "With --batch-clusters: split each caption cluster by the first colour word its captions name (usually the "
        "upper garment's), so a group shares the wording and that colour and its in-batch negatives differ in the "
        "garment types, gender and the rest. Use fewer clusters with it (30 for 10k pairs: groups that share that "
        "colour and often the action). Measured worse: with 30 clusters, validation R@1 55.6 against the default's "
        "61.6-62.7 (docs/demo-quality.md, tenth session); off by default.",
    )
    word_loss: float = field(
        0.0,
        "Weight of an auxiliary loss that predicts each training caption's word pieces from its image's ITC feature "
        "(a linear head, softmax over the pieces in at least 5 captions; training only, not in the saved model): "
        "every step then asks the image side for every stated detail, garment types included, which in-batch "
        "negatives rarely isolate. Measured on one seed: within noise on the locked tower, the best demo-val so far "
        "with --tune-from 2 (docs/demo-quality.md, eleventh session). 0 = off.",
    )
    tower_warmup: int | None = field(
        None,
        "Epochs of a first stage that fine-tunes the locked image tower alone (BatchNorm statistics kept) to name each "
        "training image's caption words (one binary classifier per word piece in at least 5 captions, on its pooled "
        "final map; the classifier is then dropped), before it is locked and cached: the frozen ImageNet tower reads "
        "garment types, gender, bags and hats poorly, and a locked tower never learns them later. Measured on the "
        "demo (3 seeds): demo-val R@1 51.73 +- 0.65 and test 38.55 +- 0.87 against 47.03 and 32.53 without it, for "
        "215-234 s more on 2 cores; 6 epochs: demo-val +2.4 more on 2 seeds, for 408-477 s (docs/demo-quality.md, "
        "twelfth and thirteenth sessions). Default: 3 for lite's locked tower, 0 (off) for every other model; needs "
        "a locked timm tower.",
    )
    tower_warmup_lr: float = field(
        3e-4, "Learning rate of the tower during --tower-warmup (its classifier's: 10x), decayed linearly to zero."
    )
    on_bad_sample: str = field(
        "fail",
        "What to do with a bad record or image: stop with a message, or skip it and count it.",
        choices=["fail", "skip"],
    )
    device: str = field(
        "auto",
        "Where to train: auto = the GPU when torch sees one (under torchrun, GPU LOCAL_RANK), else the CPU.",
        choices=["auto", "cpu", "cuda"],
    )
    precision: str = field(
        "auto",
        "Arithmetic: auto = bf16 autocast on a GPU that supports it or a CPU with bf16 matrix units (Intel AMX "
        "or AVX-512 BF16, e.g. AMD Zen 4; the lite training loop 1.4-1.5x faster), else fp32; fp16 = autocast with loss scaling (GPU only).",
        choices=["auto", "fp32", "bf16", "fp16"],
    )
    grad_accum: int = field(
        1,
        "Micro-batches per optimizer step (gradients accumulated; in-batch negatives still come from one micro-batch). "
        "The learning-rate schedule counts optimizer steps.",
    )
    grad_checkpointing: bool = field(
        False,
        "Recompute activations in the backward pass: less memory for larger batches, at the cost of a second forward pass.",
    )
    compile: bool = field(False, "torch.compile the model (GPU; the first steps are slow while it compiles).")
    workers: int = field(
        -1,
        "DataLoader worker processes (kept alive across epochs); -1 = auto: none when training "
        "on a CPU with 2 cores or fewer (a worker takes a core from the model: docs/performance.md), "
        "else 1 on a CPU, up to 8 on a GPU.",
    )
    image_cache: str = field(
        "none",
        "Decode each training image once, resized to the input size: memory = one uint8 array in RAM "
        "(H x W x 3 bytes per image), disk = the same memory-mapped under the run dir (reused on resume). "
        "Batches stay bit-identical.",
        choices=["none", "memory", "disk"],
    )
    feature_cache: str = field(
        "auto",
        "Compute a locked part's output once (tpas.train.features): every training image's image features, plain and "
        "flipped (the only augmentation kept: no random crop), and every caption's locked-layer states, in RAM (fp16). "
        "auto = memory when the model locks a part and the cache takes under 40% of the machine's memory; none = "
        "run the locked parts every step (random crops kept).",
        choices=["auto", "memory", "none"],
    )
    threads: int = field(0, "Torch CPU threads (0 = all cores).")
    runs_dir: Path = field(Path("runs"), "Where run directories are created.")
    name: str = field("demo", "Run name: outputs go to <runs-dir>/<name>/.")
    resume: bool = field(
        False, "Continue exactly from <runs-dir>/<name>/checkpoint/ (its saved config is used; --epochs may extend it)."
    )
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
        if self.itm_pairs < 0:
            raise TpasError(f"--itm-pairs must be 0 (all pairs) or more; got {self.itm_pairs}.")
        if self.warmup_steps < 0:
            raise TpasError(f"--warmup-steps must be 0 or more; got {self.warmup_steps}.")
        if self.save_every < 0:
            raise TpasError(f"--save-every must be 0 (only at epoch ends) or more; got {self.save_every}.")
        if (self.batch_clusters or 0) < 0 or (
            self.cluster_group is not None and (self.cluster_group < 1 or self.batch_size % self.cluster_group)
        ):
            raise TpasError(
                f"--batch-clusters must be 0 (off) or more and --cluster-group 1 or more, dividing --batch-size "
                f"{self.batch_size}; got {self.batch_clusters} and {self.cluster_group}."
            )
        if (self.tower_warmup or 0) < 0 or self.tower_warmup_lr <= 0:
            raise TpasError(
                f"--tower-warmup must be 0 (off) or more epochs and --tower-warmup-lr positive; got "
                f"{self.tower_warmup} and {self.tower_warmup_lr}."
            )
        if self.word_loss < 0:
            raise TpasError(f"--word-loss must be 0 (off) or more; got {self.word_loss}.")
        if not 0 <= self.swap_negatives <= 1 or (self.swap_negatives and not self.pab_hard_negatives):
            raise TpasError(
                f"--swap-negatives must be a share from 0 to 1, with --pab-hard-negatives; got {self.swap_negatives}."
            )

    def resolved_tower_warmup(self, model: model_lib.ModelConfig) -> int:
        """--tower-warmup, or its default for this model: LITE_TOWER_WARMUP epochs for the lite preset
        with its tower locked, 0 for every other model."""
        if self.tower_warmup is not None:
            return self.tower_warmup
        return LITE_TOWER_WARMUP if model.preset == "lite" and model.lock_image else 0

    def resolved_batch_clusters(self, pairs: int) -> int:
        """--batch-clusters, or its default for this many training pairs: one cluster per 100 (the
        10k subset's 100 clusters, measured best so far), at most 100; none (random batches) under 100."""
        return self.batch_clusters if self.batch_clusters is not None else min(100, pairs // 100)

    def resolved_cluster_group(self) -> int:
        """--cluster-group, or a quarter of the batch (1 when the batch size is not a multiple of 4)."""
        if self.cluster_group is not None:
            return self.cluster_group
        return self.batch_size // 4 if self.batch_size % 4 == 0 else 1


# How a resume treats this command's flags (tpas.cli.given_fields tells a given flag from a default):
# - how, not what, the run computes: this command's value, given or not;
RUNTIME_FIELDS = (
    "resume",
    "max_steps",
    "progress",
    "workers",
    "threads",
    "device",
    "compile",
    "grad_checkpointing",
    "image_cache",
    "save_every",
)
# - where things are (the data may have moved; --init is superseded by the checkpoint): given ones
#   are used, with a note when they differ;
LOCATION_FIELDS = ("data_root", "runs_dir", "name", "init")
# - the length of the run: a given one extends (or shortens) it, with a note on the schedule;
SCHEDULE_FIELDS = ("epochs", "steps")
# - everything else is what the run is: the saved value; a given one that differs is refused.


# TrainConfig fields that only override the preset's ModelConfig (None = the preset's value); what
# they resolve to is saved in config.json's "model".
# - those that are ModelConfig fields of the same name and meaning:
SAME_NAME_MODEL_FLAGS = (
    "image_stage",
    "image_tokens",
    "image_layers",
    "pixel_stem",
    "tune_from",
    "lock_image",
    "lock_text_layers",
    "fusion_layers",
    "embed_dim",
)
MODEL_FLAGS = (
    *model_lib.TEXT_FIELDS,
    *SAME_NAME_MODEL_FLAGS,
    "image_height",
    "image_width",
    "image_stages",
    "image_grid_rows",
    "image_grid_cols",
    "hf_model",
)


def model_config_for(cfg: TrainConfig) -> model_lib.ModelConfig:
    # a flag overrides the preset only when given (None = not given)
    overrides: dict[str, Any] = {
        name: getattr(cfg, name) for name in model_lib.TEXT_FIELDS if getattr(cfg, name) is not None
    }
    base = model_lib.ModelConfig.from_preset(cfg.model)
    if cfg.image_height or cfg.image_width:
        overrides["image_size"] = (cfg.image_height or base.image_size[0], cfg.image_width or base.image_size[1])
    if cfg.image_grid_rows or cfg.image_grid_cols:
        overrides["image_grid"] = (cfg.image_grid_rows or base.image_grid[0], cfg.image_grid_cols or base.image_grid[1])
    if cfg.image_stages:
        overrides["image_stages"] = tuple(cfg.image_stages)
    for name in SAME_NAME_MODEL_FLAGS:
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    if cfg.hf_model is not None:
        if not model_lib.family(base.family).reads_hf_model:
            raise TpasError(f"--hf-model is for the blip-itm and clip presets; --model {cfg.model} does not read it.")
        overrides["hf_model"] = cfg.hf_model
    return model_lib.ModelConfig.from_preset(cfg.model, **overrides)
