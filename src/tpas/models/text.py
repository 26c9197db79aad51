"""Caption text pipelines: how a caption becomes the token ids a model reads.

A model only works on text prepared the way it was trained on, so every stage that feeds
captions to a model (training, validation, `infer.py`, the benchmarks) goes through one
`TextPipeline` built from the run's `ModelConfig` (`build_text_pipeline`). Its knobs are
ModelConfig fields: set by the preset, overridden by a `train.py` flag only when that flag is
given, and recorded in `runs/<name>/config.json`, so a trained run keeps its pipeline.

- `caption_clean`: `pre_caption` = X-VLM's and CMP's `pre_caption(caption, max_words)`
  (X-VLM `dataset/utils.py`; see `pre_caption` below); `strip` = surrounding whitespace only
  (what a BERT/MiniLM, BLIP or CLIP tokenizer is given as is).
- `max_words`: the words `pre_caption` keeps (30 in X-VLM's and CMP's retrieval configs).
- `trailing_sep`: False = X-VLM's own BertTokenizer (`models/tokenization_bert.py`,
  `build_inputs_with_special_tokens`), which emits `[CLS]` + word pieces and no `[SEP]`;
  True = the tokenizer's own special tokens (`[CLS] … [SEP]` for BERT/MiniLM/BLIP, CLIP's
  start/end tokens).
- `max_tokens`: ids per caption, special tokens included (X-VLM 40, CMP 56, BLIP 35, CLIP 77).
- `pad_to_max_tokens`: pad every caption to `max_tokens` rather than to the batch's longest.
  Padded positions carry attention mask 0, so for X-VLM, BLIP and CLIP the outputs are the same
  either way (X-VLM's evaluation pads to 40; the reference fixtures show the difference is float
  rounding) and padding to the longest is faster. CMP's text feature averages over every position
  after [CLS], padding included (`models/cmp.py`, `AdaptiveAvgPool1d(3)`), so CMP needs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from tpas.errors import TpasError

CAPTION_CLEANERS = ("pre_caption", "strip")

# X-VLM dataset/utils.py pre_caption, step by step (the order matters: `<PERSON>` is matched after
# lower-casing, `<person>'s` becomes `persons`)
_XVLM_PUNCTUATION = re.compile(r"([,.'!?\"()*#:;~])")
_WHITESPACE_RUN = re.compile(r"\s{2,}")  # Unicode \s: no-break spaces and \r\n collapse too


def pre_caption(caption: str, max_words: int) -> str:
    """X-VLM's caption cleaning: lower-case; delete , . ' ! ? " ( ) * # : ; ~; `-` and `/` to
    spaces; `<person>` to `person`; whitespace runs to one space; strip; keep the first
    `max_words` words split on single spaces. ValueError when nothing is left, as X-VLM raises."""
    text = _XVLM_PUNCTUATION.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    if not text:
        raise ValueError("pre_caption yields invalid text")
    return text


@dataclass(frozen=True)
class TextPipeline:
    """Clean and tokenize captions for one model (see the module docstring for the knobs)."""

    tokenizer: Any
    caption_clean: str = "strip"
    max_words: int = 30
    trailing_sep: bool = True
    max_tokens: int = 70
    pad_to_max_tokens: bool = False

    def __post_init__(self) -> None:
        if self.caption_clean not in CAPTION_CLEANERS:
            raise TpasError(f"caption_clean must be one of {CAPTION_CLEANERS}; got {self.caption_clean!r}.")
        if self.max_words < 1:
            raise TpasError(f"max_words must be at least 1; got {self.max_words}.")
        if self.max_tokens < 2:
            raise TpasError(f"max_tokens must be at least 2 (a start token and one word piece); got {self.max_tokens}.")
        if not self.trailing_sep and getattr(self.tokenizer, "sep_token_id", None) is None:
            raise TpasError(
                f"trailing_sep false drops a BERT tokenizer's final [SEP], but "
                f"{type(self.tokenizer).__name__} has no [SEP]; keep its own special tokens."
            )

    def clean(self, caption: str) -> str:
        """The caption as the model reads it, before tokenization (ValueError: nothing left)."""
        if self.caption_clean == "pre_caption":
            return pre_caption(caption, self.max_words)
        text = caption.strip()
        if not text:
            raise ValueError("the caption is empty")
        return text

    def check(self, captions: list[str], names: list[str], source: str) -> None:
        """A TpasError naming the first caption that cleans to nothing (`names[i]` says where
        captions[i] came from, e.g. "line 12" or "query 0042")."""
        for caption, name in zip(captions, names):
            try:
                self.clean(caption)
            except ValueError:
                hint = (
                    "X-VLM's pre_caption deletes punctuation, so give it words, or train with --caption-clean strip"
                    if self.caption_clean == "pre_caption"
                    else "give it words"
                )
                raise TpasError(
                    f"{source}: {name}: caption {caption!r} is empty once cleaned for the model; {hint}."
                ) from None

    def _encode(self, captions: list[str], **kwargs: Any) -> dict[str, Any]:
        texts = [self.clean(c) for c in captions]
        # Without the trailing [SEP], allow one more id so that max_tokens real ids remain.
        limit = self.max_tokens if self.trailing_sep else self.max_tokens + 1
        return self.tokenizer(texts, truncation=True, max_length=limit, **kwargs)

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask [B, L], padded to the batch's longest caption (or to max_tokens)."""
        out = self._encode(
            list(captions), padding="max_length" if self.pad_to_max_tokens else "longest", return_tensors="pt"
        )
        ids, mask = out["input_ids"], out["attention_mask"]
        if not self.trailing_sep:
            lengths = mask.sum(1)
            rows = torch.arange(len(ids))
            last = ids[rows, lengths - 1]
            if not bool((last == self.tokenizer.sep_token_id).all()):
                raise TpasError(
                    f"{type(self.tokenizer).__name__} did not end every caption with [SEP]; "
                    f"it is not a BERT tokenizer: keep its own special tokens (trailing_sep true)."
                )
            ids, mask = ids.clone(), mask.clone()
            ids[rows, lengths - 1] = self.tokenizer.pad_token_id
            mask[rows, lengths - 1] = 0
            width = self.max_tokens if self.pad_to_max_tokens else int(lengths.max()) - 1
            ids, mask = ids[:, :width].contiguous(), mask[:, :width].contiguous()
        return {"input_ids": ids, "attention_mask": mask}

    def lengths(self, captions: list[str]) -> list[int]:
        """Token count of each caption as __call__ gives it (for sorting by length)."""
        drop = 0 if self.trailing_sep else 1
        return [len(ids) - drop for ids in self._encode(list(captions))["input_ids"]]

    def describe(self) -> str:
        clean = f"pre_caption({self.max_words} words)" if self.caption_clean == "pre_caption" else "strip"
        specials = "the tokenizer's special tokens" if self.trailing_sep else "[CLS] + word pieces, no [SEP]"
        padding = f"padded to {self.max_tokens}" if self.pad_to_max_tokens else f"<= {self.max_tokens} ids"
        return f"{clean}, {specials}, {padding}"
