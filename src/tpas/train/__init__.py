"""Fine-tuning, apart from the model library (tpas.models), as open_clip_train is from open_clip.

- `config`: `TrainConfig` (train.py's flags) and its resolution to the run's ModelConfig;
- `data`: the pair dataset, resumable sampler, collation, loaders, image cache;
- `checkpoint`: save, find and resume checkpoints (RNG state included), `--init` weights;
- `warmup`: `--tower-warmup`, the locked tower's caption-word stage; `dropout`: CPU dropout masks;
- `loop`: `train`, one optimizer step, validation.
May import tpas.models, tpas.runtime, tpas.data, tpas.io, tpas.cli; never retrieval or the stages.
"""

from tpas.train.config import TrainConfig, model_config_for
from tpas.train.loop import train

__all__ = ["TrainConfig", "model_config_for", "train"]
