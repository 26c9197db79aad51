"""Tests never reach a model hub: everything loads from installed packages or tmp files."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # after the environment above, which must be set before anything imports transformers


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory):
    """A tiny demo set in PAB's layout (240 train pairs, 24 test queries), built once per session."""
    from tpas.demo import build_demo

    root = tmp_path_factory.mktemp("demo")
    build_demo(root, seed=0, n_train=240, n_test=24, workers=1, progress=False)
    return root
