"""Command line: calibrate Gamma (spec section 5) for a trained checkpoint or a pretrained network of another project.

    python -m analytic_dpm.calibrate --ckpt outputs/train/.../checkpoints/last.ckpt --num-samples 100
    python -m analytic_dpm.calibrate --ckpt last.ckpt --out last_M1000.ckpt --num-samples 1000 \\
        --data root=/data/elsewhere

(``python -m analytic_dpm.training.calibrate``, its older name, is the same command.) Both branches go through the
package's one calibration path, :func:`analytic_dpm.calibration.calibrate_gamma`.

The datamodule is rebuilt from the checkpoint's ``data`` config (``--data KEY=VALUE`` overrides keys, e.g. when
the dataset moved). ``ckpt_path=PATH`` / ``num_samples=M`` (Hydra style) are accepted as well.

A pretrained network of another project (the kinds of :mod:`analytic_dpm.pretrained`) gets a Gamma file that
``python evaluate.py ... eval.gamma_path=FILE`` reads:

    python -m analytic_dpm.calibrate --pretrained diffusers --source ddpm-cifar10-32 \
        --dataset cifar10 --data root=data --out gamma_ddpm_cifar10.pt -M 100
    python -m analytic_dpm.calibrate --pretrained improved_diffusion --source model.pt \
        --option image_size=32 --option num_res_blocks=3 --dataset cifar10 --out gamma.pt
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys

import yaml

from .data import DatasetNotAvailableError
from .errors import ConfigError, UserError


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _hydra_style(argv: list[str]) -> list[str]:
    """Turn ``ckpt_path=X num_samples=M`` into ``--ckpt X --num-samples M``."""
    names = {"ckpt_path": "--ckpt", "ckpt": "--ckpt", "out_path": "--out", "out": "--out",
             "num_samples": "--num-samples", "batch_size": "--batch-size", "device": "--device", "seed": "--seed"}
    out: list[str] = []
    for a in argv:
        key = a.split("=", 1)[0]
        if not a.startswith("-") and "=" in a and key in names:
            out += [names[key], a.split("=", 1)[1]]
        else:
            out.append(a)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analytic_dpm.calibrate",
        description="Estimate Gamma (Analytic-DPM, spec section 5) with a checkpoint's EMA weights and store it "
        "in the checkpoint (checkpoint['analytic_dpm']['gamma']).",
    )
    p.add_argument("ckpt_pos", nargs="?", metavar="CKPT", help="checkpoint file (same as --ckpt)")
    p.add_argument("--ckpt", help="checkpoint file (.ckpt) written by train.py")
    p.add_argument("--out", default=None, help="write to this file instead of updating CKPT in place")
    p.add_argument("--num-samples", "-M", type=int, default=100, help="M, draws per timestep (default 100)")
    p.add_argument("--batch-size", type=int, default=500, help="network batch (default 500)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                   help="the network's precision (analytic_dpm.accel): fp32 = TF32 off (default), tf32, bf16")
    p.add_argument("--compile", choices=["auto", "true", "false"], default="false",
                   help="torch.compile the network (auto: on CUDA; default false: compiling costs more than a "
                        "short calibration gains)")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none", help="older spelling of --precision bf16")
    p.add_argument("--data", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's data config (repeatable), e.g. root=/data")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("pretrained networks of other projects (instead of --ckpt)")
    g.add_argument("--pretrained", metavar="KIND", help="diffusers | improved_diffusion | ddpm")
    g.add_argument("--source", help="the pretrained model's file, directory or Hub id")
    g.add_argument("--option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="an option of that format (its own flag names), repeatable")
    g.add_argument("--dataset", help="the training data: a name of conf/data (cifar10, celeba64, image_folder, ...)")
    return p


def calibrate_pretrained(args) -> int:
    """Gamma of a pretrained network on a dataset's training split, written to ``--out``."""
    import torch

    from .calibration import calibrate_gamma
    from .data import get_datamodule_class
    from .gamma import save_gamma_file
    from .pretrained import load as load_pretrained
    from .registry import build_datamodule

    if not args.source or not args.out or not args.dataset:
        print("error: --pretrained needs --source PATH, --dataset NAME and --out FILE", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        m = load_pretrained(args.pretrained, args.source, device=device, **dict(args.option))
        cls = get_datamodule_class(args.dataset)
        data = dict(args.data)
        accepted = inspect.signature(cls).parameters
        for key, value in (("image_size", m.image_size), ("channels", m.channels)):
            if key in accepted and key not in data:  # the model knows its image size: no --data key to guess
                data[key] = value
                logging.getLogger(__name__).info("--dataset %s: %s=%s, the model's", args.dataset, key, value)
        try:
            dm = build_datamodule({"_target_": f"analytic_dpm.data.{cls.__name__}", **data},
                                  where=f"--dataset {args.dataset}")
        except ConfigError as e:  # a key the dataset needs: say how to give it here
            raise ConfigError(f"{e} (on this command line: --data KEY=VALUE)") from None
        dm.setup("fit")
        if (dm.channels, dm.image_size) != (m.channels, m.image_size):
            raise ValueError(f"the model takes {m.channels}x{m.image_size}^2 images, --dataset {args.dataset} gives "
                             f"{dm.channels}x{dm.image_size}^2")
        precision = _precision(args)
        gamma, _ = calibrate_gamma(m.eps_model, m.schedule, dm.train_pool(None), args.num_samples, args.batch_size,
                                   seed=args.seed, device=device, precision=precision, compile=args.compile,
                                   progress=not args.no_progress, where=f"Gamma calibration of {args.source}")
    except (UserError, FileNotFoundError, ImportError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_gamma_file(args.out, gamma, M=int(args.num_samples), seed=int(args.seed), model=m.identity,
                    dataset=args.dataset, N=m.schedule.N, precision=precision)
    print(f"Gamma (M={args.num_samples}, N={m.schedule.N}): max {float(gamma[1:].max()):.4f}, "
          f"mean {float(gamma[1:].mean()):.4f} -> {args.out}  (use it with eval.gamma_path={args.out})")
    return 0


def _precision(args) -> str:
    """``--precision``, with ``--autocast bf16`` as its older spelling; SystemExit(2) if they disagree."""
    from .training.checkpoint import calibration_precision

    try:
        return calibration_precision(args.precision, args.autocast)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    argv = _hydra_style(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pretrained:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return calibrate_pretrained(args)
    ckpt = args.ckpt or args.ckpt_pos
    if not ckpt:
        parser.error("give the checkpoint: --ckpt PATH")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .training.checkpoint import calibrate_checkpoint

    try:
        loaded = calibrate_checkpoint(
            ckpt, out_path=args.out, num_samples=args.num_samples, batch_size=args.batch_size, device=args.device,
            seed=args.seed, precision=_precision(args), compile=args.compile,
            data_overrides=dict(args.data), progress=not args.no_progress,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, DatasetNotAvailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = loaded.gamma
    print(f"Gamma (M={args.num_samples}, N={loaded.schedule.N}, {loaded.gamma_meta['seconds']:.1f}s): "
          f"max {float(g[1:].max()):.4f}, mean {float(g[1:].mean()):.4f} -> {loaded.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
