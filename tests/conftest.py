"""Shared fixtures: a tiny saved model."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """build_model("tiny") with fixed weights, saved once per session (config.json + model.safetensors)."""
    import torch

    from optvq_cli.model import build_model, save_model

    torch.manual_seed(0)
    return save_model(build_model("tiny"), tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """A second tiny model (other weights, so another sha256) for the "another model" refusals."""
    import torch

    from optvq_cli.model import build_model, save_model

    torch.manual_seed(123)
    return save_model(build_model("tiny"), tmp_path_factory.mktemp("other-model"))
