"""A trained run's model: `model.safetensors` (with a checksum) beside `config.json`.

`save_weights` / `load_weights` read and write our safetensors files (a sha256 of the tensors in
the metadata, checked on load: safetensors itself only checks the header); `load_run_model`
rebuilds a run's model offline from its config.json and weights (what infer.py and the
benchmarks load).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tpas import models as model_lib
from tpas.errors import TpasError
from tpas.io import atomic_path, read_json

DIGEST_KEY = "tpas_sha256"  # safetensors metadata: a digest of every tensor, checked on load


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_weights(
    model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None, exclude: tuple[str, ...] = ()
) -> None:
    """The state dict as safetensors (with a checksum), leaving out the keys that start with `exclude`."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith(exclude)}
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
        raise TpasError(
            f"{path}: the weights are corrupted (their checksum no longer matches the one saved with them); "
            f"restore the file or re-train."
        )
    if recorded is None:  # saved before checksums: at least refuse what can only be damage
        bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise TpasError(
                f"{path}: tensor {bad} holds NaN or infinite values (a damaged file?); restore it or re-train."
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TpasError(
            f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            f"use the config.json saved with them."
        )


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
