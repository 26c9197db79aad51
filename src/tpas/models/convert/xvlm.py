"""Initial weights for `train.py --init PATH`: a run of ours, X-VLM's or CMP's released checkpoints.

Accepted sources:
- a run directory of ours (`runs/<name>/`, its model.safetensors) or any `.safetensors` file,
  in our own key names;
- a PyTorch file (`.th`, `.pth`, `.pt`, `.bin`) read with `torch.load(weights_only=True)` only
  (an arbitrary pickle is refused): a raw state dict or one under `model` / `state_dict` /
  `module`, in our names or in X-VLM's (e.g. `16m_base_model_state_step_199999.th`).

X-VLM's names map to ours by the explicit rules in `xvlm_target`:
- `vision_encoder.*`: Microsoft's Swin layout (patch merging at the END of stage N, the
  `relative_position_index` / `attn_mask` buffers saved). timm's own converter
  (`timm.models.swin_transformer.checkpoint_filter_fn`) moves the patch merging to the start of
  stage N+1, drops the buffers (timm rebuilds them) and resizes the relative-position tables when
  the window differs (e.g. X-VLM pre-trained at window 7, fine-tuned at 12).
- `text_encoder.bert.*` (pre-training, BertForMaskedLM) or `text_encoder.*` (fine-tuned
  BertModel): the embeddings and layers below X-VLM's `fusion_layer` form our text encoder;
  layers from there on (self-attention, cross-attention to the 1024-wide Swin tokens, FFN)
  become `fusion.<i>`.
- `vision_proj`, `text_proj`, `itm_head.{0,1,3}` (Linear, LayerNorm, GELU, Linear) and `temp`
  keep their names.
- Not used here, reported as ignored: the MLM head `text_encoder.cls.*`, `bbox_head.*`, the BERT
  pooler, `position_ids` and the Swin buffers.

CMP's checkpoints (`cmp.pth`, github.com/Shuyu-XJTU/CMP; CMP_Baseline_Code/models/cmp.py and
model_search.py in WWW2025Workshop) are X-VLM's layout plus:
- ITC heads `vision_proj.{0,2}` / `text_proj.{0,2}` (BatchNorm1d, Dropout, Linear over pooled
  tokens, 3072 -> 2048): they load into the `cmp` preset (`itc_head="cmp"`), which has the same
  modules under the same names; another preset refuses the checkpoint with a sentence;
- the pose branch `pose_block.*` (cross-attention from pose to image tokens) and `pose_conv.*`
  (the pose image's conv stem): reported as ignored, since tpas ranks from the RGB image alone
  (CMP's `be_pose_img` adds PAB's pose renderings at inference);
- no BERT pooler, no `bbox_head`.
Loading X-VLM's checkpoint into the `cmp` preset reports X-VLM's Linear ITC heads as ignored: they
do not fit CMP's pooled heads, which start fresh (as when CMP itself starts from X-VLM).

Every source key that maps nowhere and every model key left uninitialised is printed and
returned in the report; a shape that does not fit (and cannot be interpolated) is a TpasError.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tpas.errors import TpasError
from tpas.models.base import RetrievalModel
from tpas.models.xvlm import DirectTokens, XVLMModel

TORCH_SUFFIXES = (".th", ".pth", ".pt", ".bin")
STATE_DICT_KEYS = ("model", "state_dict", "module")  # where training scripts nest the weights

# X-VLM keys this model has no use for, with the reason shown in the report
XVLM_IGNORED = (
    (re.compile(r"^vision_encoder\..*(relative_position_index|attn_mask)$"), "Swin buffer (rebuilt by timm)"),
    (re.compile(r"^vision_encoder\.head\."), "Swin ImageNet classifier"),
    (re.compile(r"^text_encoder\.(bert\.)?embeddings\.position_ids$"), "BERT buffer"),
    (re.compile(r"^text_encoder\.(bert\.)?pooler\."), "BERT pooler (unused)"),
    (re.compile(r"^text_encoder\.cls\."), "MLM head (pre-training only)"),
    (re.compile(r"^bbox_head\."), "box head (pre-training / grounding only)"),
    (
        re.compile(r"^pose_(block|conv)\."),
        "CMP's pose branch (tpas ranks from the RGB image alone, without PAB's pose images)",
    ),
)
_CMP_ONLY = re.compile(r"^(pose_block|pose_conv)\.|^(vision|text)_proj\.[02]\.")  # keys X-VLM's checkpoints lack
_XVLM_ITC_HEAD = ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias")
_XVLM_TEXT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_XVLM_SAME_NAME = ("vision_proj.", "text_proj.", "itm_head.")
_TIMM_DROPS = ("relative_position_index", "attn_mask")  # what timm's checkpoint_filter_fn skips


# ---------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors stored at `path` (run dir, .safetensors, or a weights-only torch file)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise TpasError(
                f"{path}: a directory without model.safetensors; pass a run dir of ours (runs/<name>/) "
                f"or a checkpoint file."
            )
        path = path / "model.safetensors"
    if not path.is_file():
        raise TpasError(f"{path}: no such checkpoint file; check the --init path.")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TpasError(f"{path}: not a readable safetensors file ({exc}); re-download or re-save it.") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise TpasError(
            f"{path}: unknown checkpoint type {path.suffix!r}; use a run dir, .safetensors, or one of {TORCH_SUFFIXES}."
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TpasError(
            f"{path}: holds more than tensors (torch.load weights_only refused it: "
            f"{str(exc).splitlines()[0]}); arbitrary pickles are never loaded - re-save it as a "
            f"state dict (torch.save(model.state_dict(), ...)) or as .safetensors."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # torch's zip reader, truncated files, ...
        raise TpasError(f"{path}: not a readable PyTorch checkpoint ({exc}).") from None
    return _unwrap(data, path)


def _unwrap(data: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: raw, or under model / state_dict / module (DDP's
    `module.` prefix removed)."""
    for _ in range(3):  # e.g. {"model": {"module": {...}}}
        if not isinstance(data, dict):
            break
        nested = next((data[k] for k in STATE_DICT_KEYS if isinstance(data.get(k), dict)), None)
        if nested is None or any(isinstance(v, torch.Tensor) for v in data.values()):
            break
        data = nested
    if not isinstance(data, dict) or not any(isinstance(v, torch.Tensor) for v in data.values()):
        raise TpasError(
            f"{path}: no state dict found (expected tensors, or a dict holding them under {STATE_DICT_KEYS})."
        )
    state = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------- X-VLM names


def is_xvlm_state_dict(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("vision_encoder.") for k in state) and any(k.startswith("text_encoder.") for k in state)


def is_cmp_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """X-VLM's layout with CMP's pooled ITC heads or its pose branch."""
    return is_xvlm_state_dict(state) and any(_CMP_ONLY.search(k) for k in state)


def xvlm_ignored_reason(key: str, itc_head: str = "cls") -> str | None:
    if itc_head == "cmp" and key in _XVLM_ITC_HEAD:
        return "X-VLM's Linear ITC head does not fit CMP's pooled head, which starts fresh (as in CMP)"
    return next((reason for pattern, reason in XVLM_IGNORED if pattern.search(key)), None)


def xvlm_target(key: str, text_layers: int, fusion_layers: int) -> str | None:
    """Our name for a non-vision X-VLM key (None: no counterpart). Text layers [0, text_layers)
    stay in the text encoder; [text_layers, text_layers + fusion_layers) become fusion.<i>."""
    if key.startswith(_XVLM_SAME_NAME) or key == "temp":
        return key
    for prefix in ("text_encoder.bert.", "text_encoder."):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            break
    else:
        return None
    if rest.startswith("embeddings."):
        return f"text_encoder.{rest}"
    match = _XVLM_TEXT_LAYER.match(rest)
    if not match:
        return None
    index, tail = int(match[1]), match[2]
    if index < text_layers:
        # X-VLM's text-only layers have no cross-attention; one here means another layer split
        return None if tail.startswith("crossattention.") else f"text_encoder.encoder.layer.{index}.{tail}"
    if index < text_layers + fusion_layers:
        return f"fusion.{index - text_layers}.{tail}"
    return None


def _convert_swin(
    vision: dict[str, torch.Tensor],
    image_encoder: torch.nn.Module,
    path: str,
) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str], list[str]]:
    """Official Swin keys (prefix removed) -> {source key: (timm key, tensor)}, plus the keys with
    no counterpart and the resized relative-position tables (timm names)."""
    from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

    if not isinstance(image_encoder, SwinTransformer):
        raise TpasError(
            f"{path}: an X-VLM checkpoint needs a Swin image encoder, this model has "
            f"{type(image_encoder).__name__}; use --model xvlm-base."
        )
    targets = image_encoder.state_dict()
    tables, unmapped = {}, []
    for key, value in list(vision.items()):
        if not key.endswith("relative_position_bias_table"):
            continue
        module_name = key[: -len(".relative_position_bias_table")]
        try:
            heads = image_encoder.get_submodule(module_name).relative_position_bias_table.shape[1]
        except AttributeError:  # a block this model does not have: leave it to the unmapped list
            unmapped.append(key)
            del vision[key]
            continue
        if value.ndim != 2 or value.shape[1] != heads:
            raise TpasError(
                f"{path}: vision_encoder.{key} has shape {tuple(value.shape)} but the model's "
                f"image_encoder.{module_name} has {heads} heads; this checkpoint's Swin is another size."
            )
        tables[key] = tuple(value.shape)
    kept = [k for k in vision if not any(n in k for n in _TIMM_DROPS)]  # the keys timm's converter returns, in order
    try:
        converted = checkpoint_filter_fn(dict(vision), image_encoder)
    except (ValueError, RuntimeError, AssertionError) as exc:  # timm's interpolation names no key
        raise TpasError(
            f"{path}: timm could not convert the Swin weights ({exc}); the relative-position tables "
            f"{sorted(tables)[:3]} do not fit this model's windows."
        ) from None
    if len(converted) != len(kept):
        raise TpasError(
            f"{path}: timm's Swin conversion kept {len(converted)} of {len(kept)} tensors; "
            f"this timm version converts differently - report it."
        )
    mapped, resized = {}, []
    for source, (target, value) in zip(kept, converted.items()):
        if target not in targets:
            if not xvlm_ignored_reason(f"vision_encoder.{source}"):
                unmapped.append(source)
            continue
        mapped[source] = (target, value)
        if source in tables and tables[source] != tuple(value.shape):
            resized.append(f"image_encoder.{target}")
    return mapped, unmapped, resized


# ---------------------------------------------------------------- loading


def load_initial_weights(model: RetrievalModel, path: str | Path) -> dict:
    """Load the weights at `path` into `model` (before training) and report what happened.

    Returns {"path", "schema" ("tpas" | "xvlm" | "cmp"; tpas = our own names), "loaded", "ignored", "unmapped", "missing",
    "interpolated", "counts"}: model keys loaded, source keys ignored on purpose (with the
    reason), source keys with no counterpart, model keys left as they were (uninitialised), and
    relative-position tables resized to the model's windows. Unmapped and missing keys are also
    printed, loudly. A shape that does not fit is a TpasError naming the key.
    """
    path = Path(path)
    return load_state(model, read_state_dict(path), str(path))


def load_state(model: RetrievalModel, state: dict[str, torch.Tensor], path: str) -> dict:
    """load_initial_weights for a state dict already read (`path` names it in messages)."""
    targets = model.state_dict()
    pairs: dict[str, tuple[str, torch.Tensor]] = {}  # source key -> (model key, tensor)
    ignored: dict[str, str] = {}
    unmapped: list[str] = []
    interpolated: list[str] = []

    if is_xvlm_state_dict(state):
        schema = "cmp" if is_cmp_state_dict(state) else "xvlm"
        if not isinstance(model, XVLMModel) or not isinstance(model.image_adapter, DirectTokens):
            raise TpasError(
                f"{path}: an X-VLM/CMP checkpoint fits only the X-VLM-style models; use --model "
                f"{'cmp' if schema == 'cmp' else 'xvlm-base'}."
            )
        itc_head = model.cfg.itc_head
        if (
            schema == "cmp"
            and itc_head != "cmp"
            and any(k.startswith(("vision_proj.0.", "vision_proj.2.")) for k in state)
        ):
            raise TpasError(
                f"{path}: a CMP checkpoint, whose ITC heads pool the tokens (vision_proj.0/.2); "
                f"--model {model.cfg.preset} has X-VLM's; use --model cmp."
            )
        vision = {}
        for key, value in state.items():
            reason = xvlm_ignored_reason(key, itc_head)
            if reason:
                ignored[key] = reason
            if key.startswith("vision_encoder."):
                vision[key[len("vision_encoder.") :]] = value  # buffers too: timm's converter drops them itself
            elif not reason:
                target = xvlm_target(key, len(model.text_encoder.encoder.layer), len(model.fusion))
                if target is None:
                    unmapped.append(key)
                else:
                    pairs[key] = (target, value)
        swin, swin_unmapped, interpolated = _convert_swin(vision, model.image_encoder, path)
        pairs.update({f"vision_encoder.{k}": (f"image_encoder.{t}", v) for k, (t, v) in swin.items()})
        unmapped += [f"vision_encoder.{k}" for k in swin_unmapped]
    else:
        schema = "tpas"
        for key, value in state.items():
            pairs[key] = (key, value)

    loaded: dict[str, torch.Tensor] = {}
    bad_shapes = []
    for source, (target, value) in pairs.items():
        if target not in targets:
            unmapped.append(source)
        elif targets[target].shape != value.shape:
            bad_shapes.append(f"{source} {tuple(value.shape)} vs model {target} {tuple(targets[target].shape)}")
        else:
            loaded[target] = value
    if bad_shapes:
        more = f" (and {len(bad_shapes) - 3} more)" if len(bad_shapes) > 3 else ""
        raise TpasError(
            f"{path}: shapes do not fit this model: {'; '.join(bad_shapes[:3])}{more}; "
            f"choose the --model preset the checkpoint was trained with."
        )
    if not loaded:
        raise TpasError(
            f"{path}: no tensor fits this model (keys such as {sorted(state)[:3]}); "
            f"is it a checkpoint for --model {getattr(model.cfg, 'preset', '?')}?"
        )
    model.load_state_dict(loaded, strict=False)  # copy_ casts e.g. fp16 checkpoints to the model's dtype

    missing = [k for k in targets if k not in loaded]
    report = {
        "path": str(path),
        "schema": schema,
        "loaded": sorted(loaded),
        "ignored": ignored,
        "unmapped": sorted(unmapped),
        "missing": missing,
        "interpolated": sorted(interpolated),
        "counts": {
            "source": len(state),
            "loaded": len(loaded),
            "ignored": len(ignored),
            "unmapped": len(unmapped),
            "missing": len(missing),
            "interpolated": len(interpolated),
        },
    }
    _print_report(report)
    return report


def _print_report(report: dict) -> None:
    counts = report["counts"]
    print(
        f"init: {counts['loaded']} tensors loaded from {report['path']} ({report['schema']} names; "
        f"{counts['ignored']} ignored on purpose, {counts['interpolated']} relative-position tables interpolated)"
    )
    if report["unmapped"]:
        print(
            f"WARNING: init: {len(report['unmapped'])} checkpoint tensors map to nothing in this model and were "
            f"NOT loaded: {', '.join(report['unmapped'])}"
        )
    if report["missing"]:
        print(
            f"WARNING: init: {len(report['missing'])} model tensors got NO weights from the checkpoint and keep "
            f"their random initialisation: {', '.join(report['missing'])}"
        )
