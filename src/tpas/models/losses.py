"""The training losses every model family shares: X-VLM's in-batch ITC and ITM.

- `itc_loss`: symmetric in-batch contrastive loss with a learnable temperature; identical
  captions and rows of the same image share the target mass; PAB's hard negatives are one extra
  column each.
- `itm_loss`: binary matching over the positives, one negative image and one negative caption
  per pair sampled in proportion to softmax(similarity) (`draw_negatives`), plus PAB's.
- `gather_batch`: under torch.distributed, every rank's features and tokens (with gradients), so
  W ranks of B pairs train like one process on W*B.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpas import distributed


def pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 to `length` (extra positions are masked out, so they change nothing)."""
    extra = length - t.shape[1]
    if extra == 0:
        return t
    return F.pad(t, (0, 0, 0, extra) if t.dim() == 3 else (0, extra))


def gather_batch(
    model: nn.Module,
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_ids: torch.Tensor | None,
) -> dict[str, Any] | None:
    """The global batch (every rank's rows, in rank order) under torch.distributed with more
    than one rank, else None. Token tensors are padded to the longest caption of any rank."""
    rank, world = distributed.rank_and_world() if model.gather_across_ranks else (0, 1)
    if world == 1:
        return None
    batch = len(image_feat)
    length, most, minus_fewest = distributed.max_over_ranks(input_ids.shape[1], batch, -batch, device=image_feat.device)
    if most != -minus_fewest:
        raise ValueError(f"every rank needs the same batch size to gather negatives; got {-minus_fewest} to {most}.")
    return {
        "rows": slice(rank * batch, (rank + 1) * batch),
        "length": length,
        "image_feat": distributed.all_gather(image_feat),
        "text_feat": distributed.all_gather(text_feat),
        "input_ids": distributed.all_gather(pad_tokens(input_ids, length)),
        "text_mask": distributed.all_gather(pad_tokens(attention_mask, length)),
        "image_ids": distributed.all_gather(image_ids) if image_ids is not None else None,
    }


def positive_pairs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_ids: torch.Tensor | None
) -> torch.Tensor:
    """[B, B] bool: image i and caption j match (the diagonal, identical captions, same image)."""
    ids = input_ids * attention_mask  # padding ignored
    positive = (ids[:, None, :] == ids[None, :, :]).all(-1)
    if image_ids is not None:
        positive |= image_ids[:, None] == image_ids[None, :]
    return positive


def itc_loss(
    temp: torch.Tensor,
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    positive: torch.Tensor,
    hard_image_feat: torch.Tensor | None,
    hard_text_feat: torch.Tensor | None,
    everyone: dict[str, Any] | None = None,
) -> torch.Tensor:
    """X-VLM's symmetric contrastive loss; each row's own hard negative is one extra column.
    With `everyone` (see forward), this rank's rows are scored against the global batch."""
    if everyone is None:
        sim = image_feat @ text_feat.t()
        i2t, t2i = [sim], [sim.t()]
    else:
        i2t, t2i = [image_feat @ everyone["text_feat"].t()], [text_feat @ everyone["image_feat"].t()]
    if hard_text_feat is not None:
        i2t.append((image_feat * hard_text_feat).sum(-1, keepdim=True))
    if hard_image_feat is not None:
        t2i.append((text_feat * hard_image_feat).sum(-1, keepdim=True))
    # Matching is symmetric (same caption or same image), so `positive` also serves text -> image.
    targets = positive.float() / positive.sum(1, keepdim=True)  # duplicates share the probability mass

    def soft_ce(columns: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        log_prob = F.log_softmax(torch.cat(columns, dim=1) / temp, dim=1)
        return -(log_prob[:, : target.shape[1]] * target).sum(1).mean()

    return (soft_ce(i2t, targets) + soft_ce(t2i, targets)) / 2


def draw_negatives(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One column per row, in proportion to `weights` [R, N] (zero = never), by inverse CDF from
    one uniform per row, so a row's draw does not depend on how the batch is split over ranks."""
    cdf = weights.double().cumsum(1)
    target = (uniform.double() * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)


def itm_loss(
    model: nn.Module,
    image_embeds: torch.Tensor,
    image_feat: torch.Tensor,
    text_embeds: torch.Tensor,
    text_feat: torch.Tensor,
    text_mask: torch.Tensor,
    positive: torch.Tensor,
    hard_image_embeds: torch.Tensor | None,
    hard_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    everyone: dict[str, Any] | None = None,
    pairs: int | None = None,
) -> torch.Tensor:
    """X-VLM's matching loss: per positive pair one negative image and one negative text,
    sampled in proportion to softmax(similarity) among non-matching ones, plus PAB's.
    With `everyone` (see forward), negatives come from the global batch (gathered with grad).
    pairs: only the first `pairs` rows (a random subset: batches are shuffled) get the loss, their
    negatives still drawn from the whole batch; the fusion encoder's cost falls in proportion."""
    if everyone is None:
        rows, total = slice(None), len(image_embeds)
        all_image_embeds, all_text_embeds, all_text_mask = image_embeds, text_embeds, text_mask
        all_image_feat, all_text_feat = image_feat, text_feat
    else:
        from tpas import distributed

        rows, total = everyone["rows"], len(everyone["image_feat"])
        all_image_embeds = distributed.all_gather(image_embeds)
        all_text_embeds = distributed.all_gather(pad_tokens(text_embeds, everyone["length"]))
        all_text_mask, all_image_feat, all_text_feat = (
            everyone["text_mask"],
            everyone["image_feat"],
            everyone["text_feat"],
        )
    with torch.no_grad():
        sim_i2t = (image_feat @ all_text_feat.t()).float() / model.temp
        sim_t2i = (text_feat @ all_image_feat.t()).float() / model.temp
        weights_i2t = (F.softmax(sim_i2t, dim=1) + 1e-5).masked_fill(positive, 0)
        weights_t2i = (F.softmax(sim_t2i, dim=1) + 1e-5).masked_fill(positive, 0)
        # a row whose every candidate matches (e.g. B=1) has no negative to sample
        has_neg_text = weights_i2t.sum(1) > 0
        has_neg_image = weights_t2i.sum(1) > 0
        # one uniform per row of the global batch; this rank takes its own rows' draws
        uniform = torch.rand(2, total, device=image_feat.device)[:, rows]
        kept = slice(None) if pairs is None or pairs >= len(image_embeds) else slice(0, pairs)
        has_neg_text, has_neg_image = has_neg_text[kept], has_neg_image[kept]
        neg_text = draw_negatives(weights_i2t[kept], uniform[0][kept])[has_neg_text]
        neg_image = draw_negatives(weights_t2i[kept], uniform[1][kept])[has_neg_image]
    if kept != slice(None):
        image_embeds, text_embeds, text_mask = image_embeds[kept], text_embeds[kept], text_mask[kept]
        if hard_image_embeds is not None:
            hard_image_embeds = hard_image_embeds[kept]
        if hard_text is not None:
            hard_text = tuple(t[kept] for t in hard_text)

    # (image tokens, text tokens, text mask) per group; the positives come first
    groups = [(image_embeds, text_embeds, text_mask)]
    if len(neg_image):
        groups.append((all_image_embeds[neg_image], text_embeds[has_neg_image], text_mask[has_neg_image]))
    if len(neg_text):
        groups.append((image_embeds[has_neg_text], all_text_embeds[neg_text], all_text_mask[neg_text]))
    if hard_image_embeds is not None:
        groups.append((hard_image_embeds, text_embeds, text_mask))
    if hard_text is not None:
        groups.append((image_embeds, hard_text[0], hard_text[2]))
    length = max(g[1].shape[1] for g in groups)
    logits = model.itm_logits(
        torch.cat([g[0] for g in groups]),
        torch.cat([pad_tokens(g[1], length) for g in groups]),
        torch.cat([pad_tokens(g[2], length) for g in groups]),
    )
    labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    labels[: len(image_embeds)] = 1
    return F.cross_entropy(logits, labels)


class WordHead(nn.Module):
    """Training-only auxiliary objective: predict the words of an image's caption from its ITC
    feature (a bag of word pieces; softmax cross-entropy against the caption's pieces, uniform).

    Contrastive batches rarely hold a negative that differs only in a garment's type, so ITC alone
    gives that detail little gradient; naming every caption word for every image gives it some in
    each step. `vocab` holds the word-piece ids it predicts (ids outside it are ignored); the head
    never scores retrieval and is left out of a run's final weights.
    """

    def __init__(self, embed_dim: int, vocab: torch.Tensor):
        super().__init__()
        self.register_buffer("vocab", vocab.long().clone())
        self.proj = nn.Linear(embed_dim, len(vocab))

    def targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, K]: each caption's distinct in-vocabulary pieces, uniform (an all-zero row when none)."""
        hits = (input_ids[:, :, None] == self.vocab[None, None, :]) & attention_mask[:, :, None].bool()
        present = hits.any(dim=1).float()
        return present / present.sum(dim=1, keepdim=True).clamp_min(1.0)

    def forward(self, image_feat: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        target = self.targets(input_ids, attention_mask)
        log_p = F.log_softmax(self.proj(image_feat).float(), dim=1)
        has_words = target.sum(dim=1) > 0
        per_row = -(target * log_p).sum(dim=1)
        return per_row[has_words].mean() if has_words.any() else per_row.sum() * 0.0


def word_vocab(token_ids: list[list[int]], special_ids: set[int], min_count: int) -> torch.Tensor:
    """The word-piece ids a WordHead predicts: those in at least `min_count` of the captions
    (counted once per caption), special tokens excluded; sorted, so the same captions give the
    same vocabulary."""
    counts: dict[int, int] = {}
    for ids in token_ids:
        for i in set(ids) - special_ids:
            counts[i] = counts.get(i, 0) + 1
    return torch.tensor(sorted(i for i, n in counts.items() if n >= min_count), dtype=torch.long)
