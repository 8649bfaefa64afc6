"""Train an Analytic-DPM noise predictor (Hydra entry point; config in conf/train.yaml).

    python train.py                                   # quickstart: Fashion-MNIST, small UNet, CPU-friendly
    python train.py experiment=cifar10_ls trainer=gpu # the paper's CIFAR10 (LS) model
    python train.py ckpt_path=outputs/train/.../checkpoints/last.ckpt   # resume exactly
    python train.py -m launcher=slurm experiment=cifar10_cs trainer=ddp # SLURM via submitit
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

# paths.root_dir defaults to this repository, wherever train.py is launched from
os.environ.setdefault("ADPM_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from analytic_dpm.training.run import run_cli

    return run_cli(cfg)


if __name__ == "__main__":
    main()
