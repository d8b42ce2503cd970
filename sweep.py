"""Train an inner grid of SAEs as one ensemble per device: Hydra composes the config, sae_ensemble.pipeline runs it.

    python sweep.py                                     # the embedded default: synthetic ground truth on CPU
    python sweep.py grid=paper devices=cuda             # a bigger grid on every GPU
    python sweep.py -m data=lm model=tiny layer=0,1     # outer axes as Hydra multirun jobs

Exit codes: 0 done, 1 a worker failed, 2 bad config or input (a corrupt store included),
3 done but members froze (training.freeze_after; training.allow_frozen=true accepts it),
75 interrupted after checkpointing (rerun into the same run dir to resume; the SLURM
launchers requeue on it). docs/reliability.md lists each fault with its code.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sae_ensemble import config

config.register()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    from sae_ensemble import pipeline  # here: a config Hydra refuses exits before torch is imported

    code = pipeline.run(OmegaConf.to_object(raw), Path(HydraConfig.get().runtime.output_dir))
    if code != pipeline.EXIT_OK:
        sys.exit(code)


if __name__ == "__main__":
    main()
