"""Hydra glue shared by the CLIs: the config directory and the run-id resolver."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from omegaconf import OmegaConf

# configs/ lives beside the package in the repository (and in an editable install).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("uid"):
        # cached: one value per process, so every reference to the run dir agrees
        OmegaConf.register_new_resolver("uid", lambda: f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}", use_cache=True)
