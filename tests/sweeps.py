"""Sweep configs for tests, composed in-process by Hydra's compose API exactly as `python sweep.py` composes them."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from sae_ensemble import config

REPO = Path(__file__).resolve().parents[1]


def compose_config(*overrides: str) -> config.SweepConfig:
    """conf/config.yaml with `overrides` (Hydra's override syntax), as the SweepConfig the pipeline runs.

    Hydra's own checks apply (types, the closed choices): a bad value raises Hydra's error here."""
    config.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        raw = compose("config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(raw)  # for ${hydra:...} in the config (the sweep's name)
        with open_dict(raw):
            del raw["hydra"]
        return OmegaConf.to_object(raw)
