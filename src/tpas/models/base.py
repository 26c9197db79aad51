"""`RetrievalModel`: the interface every model family provides, and what they share.

Families implement `encode_image`, `encode_text` and `itm_logits` (and say which parameters are
new); training and retrieval use nothing else. `forward` computes the shared losses
(tpas.models.losses); `param_groups` the AdamW groups; `itm_scorer` an optional faster exact
ITM path for re-ranking (the xvlm family's tpas.models.fast_itm).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tpas.models import losses
from tpas.models.config import TEMP_RANGE, ModelConfig

NO_DECAY_SUFFIXES = ("pos_embed", "position_embedding", "temp", "logit_scale", "image_cls")  # besides biases and norms


class RetrievalModel(nn.Module):
    """What training and retrieval need from a model; the X-VLM-style XVLMModel, BLIP and CLIP
    wrappers (tpas.models.hf) all provide it, and share the ITC + ITM losses (tpas.models.losses).

    image_state / text_state are whatever the model's cross encoder reads per image / caption
    (token states for X-VLM-style models; token ids for BLIP, whose ITM encoder re-reads the
    caption). They are indexed row-wise like the feats, and the gallery's are cached on disk.
    """

    cfg: ModelConfig
    temp: nn.Parameter
    has_itm: bool = True  # False: a dual encoder; retrieval ranks by ITC alone
    itm_pretrained: bool = False  # the ITM head came trained with the checkpoint: zero-shot re-ranks with it
    grad_checkpointing: bool = False
    # training: the ITM loss covers this many pairs of each micro-batch (None: all; tpas.models.losses)
    itm_pairs: int | None = None
    # training: weight of the caption-word loss of a `word_head` submodule (losses.WordHead) that the
    # trainer attaches for --word-loss (found via _modules: a class attribute of that name would hide it)
    word_loss_weight: float = 0.0
    # what a trainer attaches for training only (attach_word_head): trains as new, never in a run's weights
    TRAINING_ONLY_PREFIXES = ("word_head.",)

    # ---- what each model provides

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (image_state [B, ...], unit-norm image_feat [B, E])."""
        raise NotImplementedError

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text_state [B, L, ...], unit-norm text_feat [B, E])."""
        raise NotImplementedError

    def itm_logits(self, image_state: torch.Tensor, text_state: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, 2] (no match, match) logits for row-aligned (image, caption) pairs."""
        raise NotImplementedError

    # ---- what a model with locked (frozen) parts also provides, for training on cached features

    def cached_inputs(self) -> tuple[bool, bool]:
        """(image, text): whether image_features / text_states are frozen functions of the input,
        which training may then compute once and cache (tpas.train.features)."""
        return False, False

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no cacheable image features")

    def encode_image_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no cacheable image features")

    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no cacheable text states")

    def encode_text_states(
        self, states: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no cacheable text states")

    def reset_tuned_blocks(self) -> None:
        """Re-copy any trained copy of image-tower blocks from the tower (after the tower changed); none here."""

    def is_new_parameter(self, name: str) -> bool:
        """True for parameters not initialised from pretrained weights (they train at lr × new_lr_mult)."""
        return False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")

    def itm_scorer(self, image_embeds: torch.Tensor) -> Any | None:
        """An exact, faster ITM scorer over a gallery's image states for re-ranking (its
        `logits(text_state, text_mask, candidates)` gives [Q, k, 2]), or None: score pairs with
        itm_logits."""
        return None

    def itm_score(self, image_state: torch.Tensor, text_state: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Match score [B] (logit of "match" minus logit of "no match") for row-aligned pairs."""
        logits = self.itm_logits(image_state, text_state, text_mask)
        return logits[:, 1] - logits[:, 0]

    # ---- training

    def attach_word_head(self, head: nn.Module, weight: float) -> None:
        """Add `head` (losses.WordHead) as the training-only caption-word loss, weighted `weight`."""
        self.word_head = head
        self.word_loss_weight = weight

    # Under torch.distributed with more than one rank, the losses use every rank's pairs (below).
    gather_across_ranks: bool = True

    def forward(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hard_images: torch.Tensor | None = None,
        hard_input_ids: torch.Tensor | None = None,
        hard_attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        hard_image_features: torch.Tensor | None = None,
        text_states: torch.Tensor | None = None,
        hard_text_states: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """ITC + ITM losses for B (image, caption) pairs, plus the caption-word loss of an
        attached `word_head` (losses.WordHead) times `word_loss_weight`.

        hard_images[j]: a non-matching image for caption j; hard_input_ids[i]: a non-matching
        caption for image i (PAB's hard_i / hard_c). image_ids (optional) marks rows showing the
        same image, which are then never used as each other's negatives; identical captions are
        detected from their tokens.

        Under torch.distributed (torchrun, W > 1 ranks, each with the same B), features and token
        states are all-gathered with gradients: each rank's loss covers its own B rows against all
        W*B pairs as candidates (ITC negatives, as X-VLM/open_clip do, and ITM negatives sampled
        from the global batch, as BLIP does). With DDP averaging the gradients, W ranks of B pairs
        then train exactly like one process on the W*B pairs.
        """
        if (hard_input_ids is None) != (hard_attention_mask is None):
            raise ValueError("hard_input_ids and hard_attention_mask go together.")
        with torch.no_grad():
            self.temp.clamp_(*TEMP_RANGE)
        image_embeds, image_feat = self._encode_image(images, image_features)
        text_embeds, text_feat = self._encode_text(input_ids, attention_mask, text_states)
        everyone = losses.gather_batch(self, image_feat, text_feat, input_ids, attention_mask, image_ids)
        if everyone is None:
            positive = losses.positive_pairs(input_ids, attention_mask, image_ids)
        else:  # [B, W*B]: this rank's rows against the global batch
            positive = losses.positive_pairs(everyone["input_ids"], everyone["text_mask"], everyone["image_ids"])[
                everyone["rows"]
            ]

        hard_img = (
            self._encode_image(hard_images, hard_image_features)
            if hard_images is not None or hard_image_features is not None
            else None
        )
        hard_txt = (
            (*self._encode_text(hard_input_ids, hard_attention_mask, hard_text_states), hard_attention_mask)
            if hard_input_ids is not None
            else None
        )

        loss_itc = losses.itc_loss(
            self.temp,
            image_feat,
            text_feat,
            positive,
            hard_img[1] if hard_img else None,
            hard_txt[1] if hard_txt else None,
            everyone,
        )
        word_head = self._modules.get("word_head")
        loss_word = (
            word_head(image_feat, input_ids, attention_mask) if word_head is not None else torch.zeros_like(loss_itc)
        )
        extra = self.word_loss_weight * loss_word
        if not self.has_itm:  # a dual encoder (CLIP): contrastive loss only
            return {
                "loss": loss_itc + extra,
                "loss_itc": loss_itc,
                "loss_itm": torch.zeros_like(loss_itc),
                "loss_word": loss_word,
            }
        loss_itm = losses.itm_loss(
            self,
            image_embeds,
            image_feat,
            text_embeds,
            text_feat,
            attention_mask,
            positive,
            hard_img[0] if hard_img else None,
            hard_txt,
            everyone,
            self.itm_pairs,
        )
        return {"loss": loss_itc + loss_itm + extra, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_word": loss_word}

    def _encode_image(
        self, images: torch.Tensor | None, features: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images) if features is None else self.encode_image_features(features)

    def _encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if states is None:
            return self.encode_text(input_ids, attention_mask)
        return self.encode_text_states(states, attention_mask)

    # ---- optimisation

    def new_parameter_names(self) -> list[str]:
        """Names of the parameters not initialised from pretrained weights (named_parameters order):
        image_pos_embed, temp, image_proj.*, image_norm.*, fusion.<i>.crossattention.*,
        vision_proj.*, text_proj.*, itm_head.*, and an attached word_head.*."""
        return [name for name, _ in self.named_parameters() if self._trains_as_new(name)]

    def _trains_as_new(self, name: str) -> bool:
        # an attached word head (training only) is new in every family
        return self.is_new_parameter(name) or name.startswith(self.TRAINING_ONLY_PREFIXES)

    def param_groups(self, weight_decay: float, lr: float, new_lr_mult: float = 2.0) -> list[dict]:
        """AdamW groups: pretrained params at lr, new ones at lr * new_lr_mult; no weight decay on
        biases, norm weights, the position embeddings and temp. Empty groups are left out."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            decay = param.ndim > 1 and not name.endswith(NO_DECAY_SUFFIXES)
            groups.setdefault((self._trains_as_new(name), decay), []).append(param)
        out = []
        for new in (False, True):
            for decay in (True, False):
                params = groups.get((new, decay))
                if params:
                    out.append(
                        {
                            "name": f"{'new' if new else 'pretrained'}{'' if decay else '_no_decay'}",
                            "params": params,
                            "lr": lr * new_lr_mult if new else lr,
                            "weight_decay": weight_decay if decay else 0.0,
                        }
                    )
        return out
