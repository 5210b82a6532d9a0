"""Every config that exists composes: each option of each group, each ``experiment=`` preset,
and the eval config (as lightning-hydra-template tests its configs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from captioner.utils.hydra import CONFIG_DIR
from tests.conftest import compose_config

CONFIGS = Path(CONFIG_DIR)
# groups whose files are not options to choose on the command line
NOT_OPTIONS = {("data", "base")}


def options(group: str) -> list[str]:
    folder = CONFIGS / group
    return sorted(p.stem for p in folder.glob("*.yaml") if (group, p.stem) not in NOT_OPTIONS)


GROUPS = ["data", "model", "model/encoder", "model/decoder", "trainer", "callbacks", "logger",
          "scheduler", "debug", "paths"]
def resolve_all(cfg) -> None:
    """Every interpolation outside Hydra's own node resolves."""
    for key in cfg:
        if key != "hydra":
            OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]


CASES = [(g, o) for g in GROUPS for o in options(g)] + [("experiment", o) for o in options("experiment")]


def test_the_cases_cover_every_group_folder():
    folders = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*") if p.is_dir()}
    assert folders - {"hydra"} == set(GROUPS) | {"experiment"}


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_resolves(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "folder"):
        overrides.append("data.root=photos")  # the one key a user must give
    cfg = compose_config("train", overrides, tmp_path)
    resolve_all(cfg)
    assert cfg.model._target_.startswith("captioner.") and cfg.data._target_.startswith("captioner.")
    if group == "model":
        assert cfg.model.decoder._target_.startswith("captioner.models.")


def test_eval_config_composes(tmp_path):
    cfg = compose_config("eval", ["ckpt_path=x.ckpt"], tmp_path)
    resolve_all(cfg)
    # decoding keys left to the checkpoint unless given
    assert all(v is None for v in cfg.decode.values())
