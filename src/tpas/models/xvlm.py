"""The X-VLM family (`xvlm`): image encoder, text encoder, cross-modal fusion encoder, ITC + ITM.

X-VLM (Zeng et al., 2022) as CMP and HFUT-LMC fine-tune it on PAB, and the lite/tiny CPU models
built the same way:
- image encoder: a timm backbone; its final feature map becomes image tokens through one of two
  adapters (`ImageTokens`): `projected` (a CNN's map projected to the text width, lite/tiny) or
  `direct` (a Swin's tokens as X-VLM uses them, xvlm-*/cmp);
- text encoder: a BERT-like `BertModel` (lite: the packaged MiniLM-L6; xvlm-*: BERT-base's first
  6 layers, the next 6 becoming the fusion layers);
- fusion encoder: `FusionLayer`s (self-attention, cross-attention to the image tokens, FFN),
  started from the text model's top layers;
- heads: ITC projections (X-VLM's Linear on the CLS, or CMP's pooled BatchNorm head,
  `itc_head="cmp"`), an ITM head (linear, or X-VLM's MLP), a learnable temperature.
Losses are the shared ones (tpas.models.losses); tpas.models.fast_itm re-ranks exactly and faster.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import timm.layers
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel
from transformers.activations import ACT2FN

from tpas.errors import TpasError
from tpas.models.backbones import (
    build_image_encoder,
    build_text_encoder,
    text_model_dir,
)
from tpas.models.base import RetrievalModel
from tpas.models.config import ModelConfig
from tpas.models.registry import register_family

# ---------------------------------------------------------------- fusion encoder


class _QKV(nn.Module):
    def __init__(self, hidden: int, kv_width: int | None = None):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width or hidden, hidden)
        self.value = nn.Linear(kv_width or hidden, hidden)


class _DenseNorm(nn.Module):
    """dense -> dropout -> residual add -> LayerNorm (BERT's *Output blocks)."""

    def __init__(self, in_dim: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, config: BertConfig, kv_width: int | None = None):
        super().__init__()
        self.heads = config.num_attention_heads
        self.attn_dropout = config.attention_probs_dropout_prob
        self.self = _QKV(config.hidden_size, kv_width)
        self.output = _DenseNorm(
            config.hidden_size, config.hidden_size, config.layer_norm_eps, config.hidden_dropout_prob
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = self._heads(self.self.query(x))
        k = self._heads(self.self.key(context))
        v = self._heads(self.self.value(context))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.output(out.transpose(1, 2).flatten(2), x)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, heads, L, D / heads]"""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class _Intermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class FusionLayer(nn.Module):
    """A BERT layer plus cross-attention to image tokens. Parameter names follow `BertLayer`
    (attention.self.query, ..., output.LayerNorm) so its weights copy over by name.

    encoder_width: the image tokens' width, read by the cross-attention key/value (X-VLM's
    `encoder_width`: the Swin's 1024 for a 768-wide BERT); None = the text width."""

    def __init__(self, config: BertConfig, encoder_width: int | None = None):
        super().__init__()
        self.attention = _Attention(config)
        self.crossattention = _Attention(config, kv_width=encoder_width)
        self.intermediate = _Intermediate(config)
        self.output = _DenseNorm(
            config.intermediate_size, config.hidden_size, config.layer_norm_eps, config.hidden_dropout_prob
        )

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor, cls_only: bool = False
    ) -> torch.Tensor:
        """text [B, L, D]; text_mask bool [B, 1, 1, L] (True = real token); image [B, N, encoder_width].
        cls_only: compute the CLS row alone ([B, 1, D]), its self-attention still over every token:
        the last layer's other rows feed nothing (the ITM head reads the CLS), so they are skipped."""
        x = self.attention(text[:, :1] if cls_only else text, text, text_mask)
        x = self.crossattention(x, image, None)  # every image token is real: no mask
        return self.output(self.intermediate(x), x)


# ---------------------------------------------------------------- image tokens

# Parameters the projected adapter creates rather than loads from pretrained weights; they train
# at lr * new_lr_mult. Everything else (CNN, text encoder, fusion self-attention/FFN) is pretrained.
NEW_PARAM_PREFIXES = (
    "image_proj.",
    "image_pos_embed",
    "image_norm.",
    "vision_proj.",
    "text_proj.",
    "itm_head.",
    "temp",
)
NEW_PARAM_INFIX = ".crossattention."  # inside fusion.<i>: the cross-attention is new
# With direct tokens every weight, cross-attention included, comes from one image-text checkpoint
# (X-VLM's or CMP's, via train.py --init); as X-VLM's own fine-tuning does, only the ITC/ITM heads
# and the temperature then train at lr * new_lr_mult.
DIRECT_NEW_PARAM_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.", "temp")


class ImageTokens:
    """How a backbone's final feature map becomes the fusion encoder's image tokens, CLS first.
    An adapter creates its parameters on the model (so their names are the model's own) and says
    which of the model's parameters are new."""

    channels_last = False  # the backbone gives [B, h, w, C] (a Swin) rather than [B, C, h, w]

    def backbone_kwargs(self, cfg: ModelConfig) -> dict[str, Any]:
        return {}

    def build(self, model: nn.Module, channels: int, grid: tuple[int, int], tcfg: BertConfig) -> int:
        """Create the adapter's parameters on `model`; returns the tokens' width."""
        raise NotImplementedError

    def features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """What the image encoder computes from the pixels (the part a locked tower caches)."""
        return model.image_encoder.forward_features(images)

    def grid_of(self, features: torch.Tensor) -> tuple[int, int]:
        return tuple(features.shape[1:3]) if self.channels_last else tuple(features.shape[2:])

    def channels_of(self, features: torch.Tensor) -> int:
        return features.shape[3] if self.channels_last else features.shape[1]

    def check(self, encoder: nn.Module, cfg: ModelConfig) -> None:
        """A TpasError when this adapter cannot read `encoder` as cfg asks."""

    def tokens(self, model: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def is_new_parameter(self, name: str) -> bool:
        raise NotImplementedError


class ProjectedTokens(ImageTokens):
    """A CNN's map projected to the text width, CLS = the tokens' mean, plus learned position
    embeddings (a pedestrian crop's layout, head above feet, carries the action) and a LayerNorm
    (BERT's states are normalised; image tokens get the same scale for cross-attention)."""

    def build(self, model: nn.Module, channels: int, grid: tuple[int, int], tcfg: BertConfig) -> int:
        hidden = tcfg.hidden_size
        model.image_proj = nn.Linear(channels, hidden)
        model.image_pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], hidden))
        nn.init.trunc_normal_(model.image_pos_embed, std=0.02)
        model.image_norm = nn.LayerNorm(hidden, eps=tcfg.layer_norm_eps)
        return hidden

    def tokens(self, model: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
        tokens = model.image_proj(fmap.flatten(2).transpose(1, 2))
        # CLS = projected global average pool; the projection is linear, so pool after projecting
        embeds = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + model.image_pos_embed
        return model.image_norm(embeds)

    def features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.image_encoder.forward_features(cnn_input(images))

    def is_new_parameter(self, name: str) -> bool:
        return name.startswith(NEW_PARAM_PREFIXES) or (name.startswith("fusion.") and NEW_PARAM_INFIX in name)


class DirectTokens(ImageTokens):
    """X-VLM's: a Swin's (final-LayerNorm'ed) tokens as they are, CLS = their mean; the
    cross-attention keys/values and vision_proj read their width (tpas.models.convert.xvlm loads
    X-VLM's and CMP's weights into this layout)."""

    channels_last = True

    def backbone_kwargs(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"img_size": cfg.image_size}  # a Swin fixes its input size (attention masks) when built

    def build(self, model: nn.Module, channels: int, grid: tuple[int, int], tcfg: BertConfig) -> int:
        return channels

    def tokens(self, model: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
        tokens = fmap.flatten(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)

    def is_new_parameter(self, name: str) -> bool:
        return name.startswith(DIRECT_NEW_PARAM_PREFIXES)


class PyramidTokens(ImageTokens):
    """Several stages of a timm EfficientNet, each resized to cfg.image_grid and concatenated per
    cell, projected to the text width, then `image_layers` new self-attention layers.

    The late map says what the person does; the early stages keep where each colour is (a frozen
    Lite0's final map alone reads garment colours poorly: docs/demo-quality.md). The self-attention
    layers make the ITC feature a function of which colour is where, which a mean of projected
    tokens cannot be. The CLS is a learned token that these layers fill.

    With cfg.pixel_stem, each cell's raw pixels also travel beside its features (so a cache holds
    them too) and a small CNN trained from scratch reads them in `tokens`: the frozen ImageNet
    tower, on a 128x64 crop, misses few-pixel details (a collar, a jacket's zip, a t-shirt's bare
    forearms: docs/demo-quality.md) that decide the caption's garment words. Measured: no gain
    for the default 10k-pair budget (the stem does not learn the garment types from ITC/ITM alone),
    so it is off by default.

    With cfg.tune_from = k, the stages read from blocks k and above (not the final map, -1) come
    from a trained copy of those blocks (`tuned_blocks`, BatchNorm statistics frozen) run on block
    k-1's output, which travels cell by cell beside the frozen features like the pixels above: the
    cache keeps the locked tower's prefix, and the pretrained mid-level filters adapt to details
    (a garment's type) that the frozen ones blur. The locked tower itself stays exact, so the frozen
    stages and the cache do not change as the copy trains."""

    def features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """[B, rows * cols, sum of the stages' channels]: the stages' maps on the grid, cell by cell."""
        encoder, stages = model.image_encoder, model.cfg.image_stages
        deepest = len(encoder.blocks) - 1 if -1 in stages else max(stages)
        deepest = max(deepest, model.cfg.tune_from - 1)
        x = encoder.bn1(encoder.conv_stem(cnn_input(images)))
        outputs = {}
        for i, block in enumerate(encoder.blocks[: deepest + 1]):  # later blocks are not read
            x = outputs[i] = block(x)
        if -1 in stages:
            outputs[-1] = encoder.bn2(encoder.conv_head(x))
        grid = model.cfg.image_grid
        parts = [_to_grid(outputs[stage], grid) for stage in stages if not _is_tuned(stage, model.cfg)]
        cells = torch.cat(parts, dim=1).flatten(2).transpose(1, 2)
        if model.cfg.tune_from:
            cells = torch.cat([cells, _to_cells(outputs[model.cfg.tune_from - 1], grid)], dim=2)
        if model.cfg.pixel_stem:
            cells = torch.cat([cells, _to_cells(images, model.cfg.image_grid).to(cells.dtype)], dim=2)
        return cells

    def check(self, encoder: nn.Module, cfg: ModelConfig) -> None:
        blocks = getattr(encoder, "blocks", None)
        if blocks is None or not hasattr(encoder, "conv_head"):
            raise TpasError(
                f"image_tokens pyramid needs a timm EfficientNet-style backbone; {type(encoder).__name__} has no stages."
            )
        bad = [s for s in cfg.image_stages if not -1 <= s < len(blocks)]
        if bad or cfg.image_stage is not None:
            raise TpasError(
                f"image_stages must be block indices 0..{len(blocks) - 1} or -1 (the final map), without "
                f"image_stage; got {list(cfg.image_stages)}."
            )
        if cfg.tune_from and not any(_is_tuned(stage, cfg) for stage in cfg.image_stages):
            raise TpasError(
                f"tune_from={cfg.tune_from} trains no stage: image_stages {list(cfg.image_stages)} has no block "
                f"index >= {cfg.tune_from} (below {len(blocks)}); lower tune_from or read a later stage."
            )
        if cfg.tune_from:  # checked here, before the model's first (dummy) forward cuts the map into cells
            _, height, width = _tuned_input_shape(encoder, cfg)
            if height % cfg.image_grid[0] or width % cfg.image_grid[1]:
                raise TpasError(
                    f"tune_from={cfg.tune_from}: block {cfg.tune_from - 1}'s {height}x{width} map is not a whole "
                    f"number of image_grid {cfg.image_grid} cells; change the grid, the image size or tune_from."
                )

    def channels_of(self, features: torch.Tensor) -> int:
        return features.shape[2]

    def grid_of(self, features: torch.Tensor) -> tuple[int, int]:
        return (features.shape[1], 1)  # checked as a token count

    def build(self, model: nn.Module, channels: int, grid: tuple[int, int], tcfg: BertConfig) -> int:
        hidden = tcfg.hidden_size
        if model.cfg.pixel_stem:
            model.pixel_stem = _pixel_stem(model.cfg.pixel_stem)
            channels += PIXEL_STEM_WIDTHS[-1] * model.cfg.pixel_stem - _cell_pixels(model.cfg)
        if model.cfg.tune_from:
            encoder, cfg = model.image_encoder, model.cfg
            # a copy, so the locked tower (and what a cache holds) stays as it was pretrained
            model.tuned_blocks = _tuned_copy(encoder, cfg)
            model.tuned_input_shape = in_channels, height, width = _tuned_input_shape(encoder, cfg)
            # what each cell of the cache holds of that map
            model.tuned_cell_width = in_channels * height * width // (cfg.image_grid[0] * cfg.image_grid[1])
            with torch.no_grad():  # the tuned stages' widths, from one dummy forward
                x, tuned_out = torch.zeros(1, *model.tuned_input_shape), 0
                for i, block in enumerate(model.tuned_blocks, start=cfg.tune_from):
                    x = block(x)
                    tuned_out += x.shape[1] if i in cfg.image_stages else 0
            channels += tuned_out - model.tuned_cell_width
        model.image_proj = nn.Linear(channels, hidden)
        model.image_cls = nn.Parameter(torch.zeros(1, 1, hidden))
        model.image_pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], hidden))
        nn.init.trunc_normal_(model.image_pos_embed, std=0.02)
        model.image_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden,
                tcfg.num_attention_heads,
                tcfg.intermediate_size,
                dropout=tcfg.hidden_dropout_prob,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(model.cfg.image_layers)
        )
        model.image_norm = nn.LayerNorm(hidden, eps=tcfg.layer_norm_eps)
        return hidden

    def tokens(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        cfg, dtype = model.cfg, model.image_proj.weight.dtype
        read = []
        if cfg.pixel_stem:
            split = features.shape[2] - _cell_pixels(cfg)
            images = _from_cells(features[..., split:].to(dtype), cfg.image_grid, (3, *cfg.image_size))
            read.append(_to_grid(model.pixel_stem(images), cfg.image_grid))
            features = features[..., :split]
        if cfg.tune_from:
            split = features.shape[2] - model.tuned_cell_width
            x = _from_cells(features[..., split:], cfg.image_grid, model.tuned_input_shape)
            outputs = {}
            # On a CPU the copy's depthwise blocks run in fp32 even under bf16 autocast: faster there
            # (fwd+bwd of blocks 2-4 on 256 crops, 2 cores with AMX: 1.93 s against 2.64 s) and exact.
            cpu = x.device.type == "cpu"
            with torch.autocast("cpu", enabled=False) if cpu else contextlib.nullcontext():
                x = x.float() if cpu else x.to(dtype)
                for i, block in enumerate(model.tuned_blocks, start=cfg.tune_from):
                    x = outputs[i] = block(x)
            read = [_to_grid(outputs[s], cfg.image_grid) for s in cfg.image_stages if _is_tuned(s, cfg)] + read
            features = features[..., :split]
        if read:
            read_cells = torch.cat(read, dim=1).flatten(2).transpose(1, 2)
            features = torch.cat([features, read_cells.to(features.dtype)], dim=2)
        x = model.image_proj(features)
        x = torch.cat([model.image_cls.expand(len(x), -1, -1).to(x.dtype), x], dim=1) + model.image_pos_embed
        for layer in model.image_layers:
            x = layer(x)
        return model.image_norm(x)

    def is_new_parameter(self, name: str) -> bool:
        # tuned_blocks are pretrained (a copy of the tower's): base lr
        return name.startswith((*NEW_PARAM_PREFIXES, "image_cls", "image_layers.", "pixel_stem.")) or (
            name.startswith("fusion.") and NEW_PARAM_INFIX in name
        )


# The pixel stem: (stride, output width as a multiple of the base width) per 3x3 conv-BN-GELU block;
# full resolution first (a zip or collar is 1-2 pixels wide), total stride 16 (8x4 cells at 128x64)
PIXEL_STEM_BLOCKS = ((1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (2, 4), (2, 8))
PIXEL_STEM_WIDTHS = tuple(w for _, w in PIXEL_STEM_BLOCKS)


def _pixel_stem(width: int) -> nn.Sequential:
    blocks, channels = [], 3
    for stride, mult in PIXEL_STEM_BLOCKS:
        out = width * mult
        blocks += [nn.Conv2d(channels, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.GELU()]
        channels = out
    return nn.Sequential(*blocks)


def _cell_pixels(cfg: ModelConfig) -> int:
    (height, width), (rows, cols) = cfg.image_size, cfg.image_grid
    return 3 * (height // rows) * (width // cols)


def _to_cells(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, rows * cols, C * cell height * cell width], row-major cells."""
    b, c, h, w = images.shape
    rows, cols = grid
    x = images.reshape(b, c, rows, h // rows, cols, w // cols).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, rows * cols, -1)


def _from_cells(cells: torch.Tensor, grid: tuple[int, int], shape: tuple[int, int, int]) -> torch.Tensor:
    """_to_cells' inverse: [B, rows * cols, C * cell area] -> [B, C, H, W] (`shape` = (C, H, W))."""
    (rows, cols), (c, h, w) = grid, shape
    x = cells.reshape(len(cells), rows, cols, c, h // rows, w // cols).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(len(cells), c, h, w)


def _tuned_copy(encoder: nn.Module, cfg: ModelConfig) -> nn.Module:
    """A trainable copy of the tower's blocks tune_from .. the deepest tuned stage (BatchNorm frozen)."""
    last = max(stage for stage in cfg.image_stages if _is_tuned(stage, cfg))
    blocks = timm.layers.freeze_batch_norm_2d(copy.deepcopy(encoder.blocks[cfg.tune_from : last + 1]))
    return blocks.requires_grad_(True)


def _is_tuned(stage: int, cfg: ModelConfig) -> bool:
    """Whether a pyramid stage comes from the trained copy of the tower's blocks (cfg.tune_from)."""
    return bool(cfg.tune_from) and stage >= cfg.tune_from


def _tuned_input_shape(encoder: nn.Module, cfg: ModelConfig) -> tuple[int, int, int]:
    """(C, H, W) of block tune_from - 1's output, which the tuned blocks read."""
    was_training = encoder.training
    encoder.eval()  # must not touch BatchNorm statistics
    with torch.no_grad():
        x = encoder.bn1(encoder.conv_stem(torch.zeros(1, 3, *cfg.image_size)))
        for block in encoder.blocks[: cfg.tune_from]:
            x = block(x)
    encoder.train(was_training)
    return tuple(x.shape[1:])


def cnn_input(images: torch.Tensor) -> torch.Tensor:
    """Pixels for a CNN tower: channels-last on a CPU, where oneDNN's convolutions (Lite0's depthwise
    ones above all) run about 1.35x faster in that layout (docs/performance.md); the features agree
    with the default layout's to float rounding. Other devices keep the layout they were given."""
    return images.contiguous(memory_format=torch.channels_last) if images.device.type == "cpu" else images


def _to_grid(fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A [B, C, h, w] map on a (rows, cols) grid: average-pooled when finer, repeated when coarser
    (nearest), as it is when it fits."""
    if tuple(fmap.shape[2:]) == tuple(grid):
        return fmap
    if fmap.shape[2] >= grid[0] and fmap.shape[3] >= grid[1]:
        return F.adaptive_avg_pool2d(fmap, grid)
    return F.interpolate(fmap, size=grid, mode="nearest")


IMAGE_TOKENS: dict[str, ImageTokens] = {
    "projected": ProjectedTokens(),
    "direct": DirectTokens(),
    "pyramid": PyramidTokens(),
}


# ---------------------------------------------------------------- the model


class XVLMModel(RetrievalModel):
    """X-VLM's architecture: image encoder -> image tokens (see ImageTokens), text encoder, fusion
    layers whose cross-attention reads the image tokens, ITC projections and an ITM head."""

    STOCK_FUSION_LAYER = FusionLayer  # what tpas.models.fast_itm's exact algebra is written for

    def __init__(self, cfg: ModelConfig, image_encoder: nn.Module, text_encoder: BertModel):
        super().__init__()
        self.cfg = cfg
        tcfg = text_encoder.config
        hidden = tcfg.hidden_size
        if cfg.text_layers is None:
            if cfg.fusion_layers > tcfg.num_hidden_layers:
                raise TpasError(
                    f"fusion_layers={cfg.fusion_layers} but the text model has only "
                    f"{tcfg.num_hidden_layers} layers to initialise them from."
                )
            source_layers = list(text_encoder.encoder.layer[-cfg.fusion_layers :])
        else:
            # X-VLM's split of one BERT: the first text_layers layers encode the caption, the
            # following fusion_layers layers become the fusion layers (with cross-attention)
            if cfg.text_layers + cfg.fusion_layers > tcfg.num_hidden_layers:
                raise TpasError(
                    f"text_layers={cfg.text_layers} + fusion_layers={cfg.fusion_layers} but the text "
                    f"model has only {tcfg.num_hidden_layers} layers."
                )
            layers = list(text_encoder.encoder.layer)
            source_layers = layers[cfg.text_layers : cfg.text_layers + cfg.fusion_layers]
            text_encoder.encoder.layer = nn.ModuleList(layers[: cfg.text_layers])
            tcfg.num_hidden_layers = cfg.text_layers
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder

        self.image_adapter = IMAGE_TOKENS[cfg.image_tokens]
        self.image_adapter.check(image_encoder, cfg)
        channels, grid = self._probe_image_grid()
        self.image_grid = grid
        self.vision_width = self.image_adapter.build(self, channels, grid, tcfg)

        encoder_width = self.vision_width if self.vision_width != hidden else None
        self.fusion = nn.ModuleList(FusionLayer(tcfg, encoder_width) for _ in range(cfg.fusion_layers))
        for fusion_layer, bert_layer in zip(self.fusion, source_layers):
            self._init_cross_attention(fusion_layer.crossattention, tcfg.initializer_range)
            result = fusion_layer.load_state_dict(bert_layer.state_dict(), strict=False)
            if result.unexpected_keys or any(not k.startswith("crossattention.") for k in result.missing_keys):
                raise TpasError(
                    f"text model layers do not fit the fusion layer layout (unexpected "
                    f"{result.unexpected_keys[:3]}, missing {result.missing_keys[:3]}); use a BERT-like model."
                )

        if cfg.itc_head == "cmp":
            # CMP's feature_mapping (BatchNorm1d, Dropout, Linear: keys .0 and .2) over the image's 3
            # pooled token groups and the caption's CLS + 3 pooled groups (models/cmp.py)
            self.vision_proj = _cmp_feature_mapping(
                CMP_POOLED_PARTS * self.vision_width, cfg.embed_dim, cfg.itc_dropout
            )
            self.text_proj = _cmp_feature_mapping((CMP_POOLED_PARTS + 1) * hidden, cfg.embed_dim, cfg.itc_dropout)
            self.token_pool = nn.AdaptiveAvgPool1d(CMP_POOLED_PARTS)
        else:
            self.vision_proj = nn.Linear(self.vision_width, cfg.embed_dim)
            self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        if cfg.itm_head == "mlp":  # X-VLM's build_mlp: keys itm_head.0 / .1 / .3
            self.itm_head = nn.Sequential(
                nn.Linear(hidden, 2 * hidden), nn.LayerNorm(2 * hidden), nn.GELU(), nn.Linear(2 * hidden, 2)
            )
        else:
            self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        self._lock(text_encoder)

    def _lock(self, text_encoder: BertModel) -> None:
        """Freeze what cfg locks (LiT: the image tower; the text embeddings and bottom layers)."""
        cfg = self.cfg
        if cfg.lock_image:
            self.image_encoder.requires_grad_(False)
        layers = len(text_encoder.encoder.layer)
        if cfg.lock_text_layers > layers:
            raise TpasError(f"lock_text_layers={cfg.lock_text_layers} but the text encoder has {layers} layers.")
        if cfg.lock_text_layers:
            text_encoder.embeddings.requires_grad_(False)
            for layer in text_encoder.encoder.layer[: cfg.lock_text_layers]:
                layer.requires_grad_(False)
        self.train(self.training)  # a module starts in training mode: the locked parts start in eval

    def cached_inputs(self) -> tuple[bool, bool]:
        return self.cfg.lock_image, self.cfg.lock_text_layers > 0

    def reset_tuned_blocks(self) -> None:
        """Start the --tune-from copy again from the tower's current blocks (after --tower-warmup
        changed them), so the copy and the locked prefix it reads come from the same tower."""
        if getattr(self, "tuned_blocks", None) is not None:
            fresh = _tuned_copy(self.image_encoder, self.cfg).to(next(self.tuned_blocks.parameters()).device)
            self.tuned_blocks.load_state_dict(fresh.state_dict())

    def locked_modules(self) -> list[nn.Module]:
        """The frozen parts, which stay in eval mode (BatchNorm statistics, no dropout) while training,
        so what training caches from them is what inference computes."""
        modules: list[nn.Module] = [self.image_encoder] if self.cfg.lock_image else []
        if self.cfg.lock_text_layers:
            modules += [self.text_encoder.embeddings, *self.text_encoder.encoder.layer[: self.cfg.lock_text_layers]]
        return modules

    def train(self, mode: bool = True) -> XVLMModel:
        super().train(mode)
        for module in self.locked_modules():
            module.eval()
        return self

    def _probe_image_grid(self) -> tuple[int, tuple[int, int]]:
        """Channels and grid of the image features, from one dummy forward (any timm backbone)."""
        encoder = self.image_encoder
        was_training = encoder.training
        encoder.eval()  # must not touch BatchNorm statistics
        with torch.no_grad():
            features = self.image_adapter.features(self, torch.zeros(1, 3, *self.cfg.image_size))
        encoder.train(was_training)
        return self.image_adapter.channels_of(features), self.image_adapter.grid_of(features)

    @staticmethod
    def _init_cross_attention(module: nn.Module, std: float) -> None:
        """BERT's initialisation for the new cross-attention (as X-VLM does)."""
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                nn.init.normal_(sub.weight, std=std)
                nn.init.zeros_(sub.bias)

    # ---- encoders

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (image_embeds [B, 1+N, vision_width], unit-norm image_feat [B, E])."""
        return self.encode_image_features(self.image_features(images))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image encoder's output before the adapter's own layers: what a locked tower caches."""
        features = self.image_adapter.features(self, images)
        grid = self.image_adapter.grid_of(features)
        if grid != self.image_grid:
            raise ValueError(
                f"images of size {tuple(images.shape[2:])} give a {grid} feature map; "
                f"this model was built for {self.cfg.image_size} ({self.image_grid})."
            )
        return features

    def encode_image_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_features' output -> (image_embeds, unit-norm image_feat), as encode_image."""
        embeds = self.image_adapter.tokens(self, features)
        return embeds, self._image_feat(embeds)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text_embeds [B, L, D] = last hidden states, unit-norm text_feat [B, E])."""
        if self.cfg.lock_text_layers:  # the same layers run one by one, so the cached path is this path
            return self.encode_text_states(self.text_states(input_ids, attention_mask), attention_mask)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, self._text_feat(hidden)

    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states after the locked bottom layers (cfg.lock_text_layers): what training caches."""
        hidden = self.text_encoder.embeddings(input_ids=input_ids)
        return self._text_layers(hidden, attention_mask, slice(0, self.cfg.lock_text_layers))

    def encode_text_states(
        self, states: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text_states' output -> (text_embeds, unit-norm text_feat), as encode_text."""
        hidden = self._text_layers(states, attention_mask, slice(self.cfg.lock_text_layers, None))
        return hidden, self._text_feat(hidden)

    def _text_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, which: slice) -> torch.Tensor:
        # BERT's additive mask, which both its eager and its SDPA attention accept
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.text_encoder.encoder.layer[which]:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
        return hidden

    def _text_feat(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cfg.itc_head == "cmp":  # CLS + the pooled positions after it, padding included (as CMP)
            pooled = self.token_pool(hidden[:, 1:].transpose(1, 2)).transpose(1, 2).flatten(1)
            return F.normalize(self.text_proj(torch.cat([hidden[:, 0], pooled], dim=1)), dim=-1)
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def _image_feat(self, embeds: torch.Tensor) -> torch.Tensor:
        """Unit ITC feature of image tokens [B, 1+N, D]: the CLS projected, or CMP's pooled patch groups."""
        if self.cfg.itc_head == "cmp":
            return F.normalize(
                self.vision_proj(self.token_pool(embeds[:, 1:].transpose(1, 2)).transpose(1, 2).flatten(1)), dim=-1
            )
        return F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)

    def fuse(self, text_embeds: torch.Tensor, text_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Row-aligned (text, image) pairs -> fused CLS [B, D]."""
        mask = text_mask.bool()[:, None, None, :]
        x = text_embeds
        last = len(self.fusion) - 1
        for i, layer in enumerate(self.fusion):
            x = layer(x, mask, image_embeds, cls_only=i == last)  # the last layer's CLS row is all that is read
        return x[:, 0]

    def itm_logits(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        fuse = self.fuse
        if self.grad_checkpointing and self.training:
            return self.itm_head(
                torch.utils.checkpoint.checkpoint(fuse, text_embeds, text_mask, image_embeds, use_reentrant=False)
            )
        return self.itm_head(fuse(text_embeds, text_mask, image_embeds))

    def is_new_parameter(self, name: str) -> bool:
        return self.image_adapter.is_new_parameter(name)

    def itm_scorer(self, image_embeds: torch.Tensor) -> Any | None:
        """tpas.models.fast_itm's exact scorer, when this model's fusion layers are the stock ones."""
        from tpas.models import fast_itm  # it builds on this module

        return fast_itm.FastItmScorer(self, image_embeds) if fast_itm.supports(self) else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass (text encoder, CNN / Swin stages, fusion layers)."""
        self.grad_checkpointing = enable
        if enable:
            self.text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.text_encoder.activation_checkpointing_disable()
        if hasattr(self.image_encoder, "set_grad_checkpointing"):
            self.image_encoder.set_grad_checkpointing(enable)


CMP_POOLED_PARTS = 3  # CMP's nn.AdaptiveAvgPool1d(3) over the tokens after CLS


def _cmp_feature_mapping(width: int, embed_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(width), nn.Dropout(dropout), nn.Linear(width, embed_dim))


def build_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of cfg.text_model (or the packaged MiniLM's, also for a random text_config)."""
    return AutoTokenizer.from_pretrained(str(text_model_dir(cfg)))


@register_family("xvlm", build_tokenizer=build_tokenizer)
def build_model(cfg: ModelConfig) -> XVLMModel:
    """An XVLMModel with the backbones cfg asks for (pretrained from packages or random)."""
    if cfg.text_config is not None:
        vocab = BertConfig(**cfg.text_config).vocab_size
        tokenizer_vocab = len(build_tokenizer(cfg))
        if vocab < tokenizer_vocab:
            raise TpasError(f"text_config vocab_size {vocab} is smaller than the tokenizer's {tokenizer_vocab}.")
    adapter = IMAGE_TOKENS[cfg.image_tokens]
    return XVLMModel(cfg, build_image_encoder(cfg, **adapter.backbone_kwargs(cfg)), build_text_encoder(cfg))
