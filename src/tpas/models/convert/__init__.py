"""Weight conversion: other code bases' checkpoints in this package's names.

- `efficientnet`: the packaged ImageNet EfficientNet-Lite0 (lukemelas' names) -> timm.
- `xvlm`: `train.py --init` sources: runs of ours, X-VLM's and CMP's released checkpoints.
"""
