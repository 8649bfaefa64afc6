"""Evaluate a trained model on the K x trajectory x method grid: NLL and FID, files + W&B (conf/evaluate.yaml).

    python evaluate.py ckpt_path=outputs/train/.../checkpoints/last.ckpt
    python evaluate.py model=oracle_gaussian                   # closed-form ground truth, no checkpoint
    python evaluate.py ckpt_path=... eval=quick                # a small grid for a CPU
    python evaluate.py -m ckpt_path=... eval.K=10,25 eval.method=analytic_ddpm,ddim   # one job per cell
    python -m analytic_dpm.evaluation.merge outputs/evaluate/multirun/<date>_<time>   # one grid from the jobs
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("ADPM_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig):
    from analytic_dpm.evaluation.run import run_cli

    run_cli(cfg)


if __name__ == "__main__":
    main()
