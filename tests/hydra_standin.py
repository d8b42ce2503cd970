"""Stand-in Hydra app for the submitit-launcher tests: seconds where the real sweep.py takes a minute.

    python tests/hydra_standin.py -m --config-dir conf hydra/launcher=slurm +point=a,b

Runs STANDIN_STEPS steps (env, default 20) of STANDIN_STEP_S seconds (default 0.1) in
Hydra's output dir, saving progress.json after every step like a periodic checkpoint;
a rerun into the same output dir (submitit's requeue) resumes from it. Writes done.json
at the end; every start appends a line to starts.log.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base=None, config_path=None)
def main(cfg: DictConfig) -> dict:
    # In multirun the job's dir is hydra.sweep.dir/hydra.sweep.subdir, not hydra.run.dir.
    out = Path(HydraConfig.get().runtime.output_dir)
    steps = int(os.environ.get("STANDIN_STEPS", "20"))
    step_s = float(os.environ.get("STANDIN_STEP_S", "0.1"))
    progress = out / "progress.json"
    state = json.loads(progress.read_text()) if progress.exists() else {"step": 0, "total": 0}
    with open(out / "starts.log", "a") as f:
        f.write(
            json.dumps(
                {
                    "from_step": state["step"],
                    "job": os.environ.get("SLURM_JOB_ID"),
                    "restarts": os.environ.get("SLURM_RESTART_COUNT", "0"),
                    "cfg": OmegaConf.to_container(cfg),
                }
            )
            + "\n"
        )
    while state["step"] < steps:
        time.sleep(step_s)
        state = {"step": state["step"] + 1, "total": state["total"] + state["step"]}
        tmp = progress.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, progress)  # atomic: a kill mid-write never leaves a torn checkpoint
    (out / "done.json").write_text(json.dumps(state))
    return state


if __name__ == "__main__":
    main()
