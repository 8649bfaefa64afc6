"""Command line: add (or redo) the Gamma calibration of a trained checkpoint.

    python -m analytic_dpm.training.calibrate --ckpt outputs/train/.../checkpoints/last.ckpt --num-samples 100
    python -m analytic_dpm.training.calibrate --ckpt last.ckpt --out last_M1000.ckpt --num-samples 1000 \\
        --data root=/data/elsewhere

The datamodule is rebuilt from the checkpoint's ``data`` config (``--data KEY=VALUE`` overrides keys, e.g. when
the dataset moved). ``ckpt_path=PATH`` / ``num_samples=M`` (Hydra style) are accepted as well.
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from ..data import DatasetNotAvailableError


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
        prog="python -m analytic_dpm.training.calibrate",
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
    p.add_argument("--autocast", choices=["none", "bf16"], default="none")
    p.add_argument("--data", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's data config (repeatable), e.g. root=/data")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = _hydra_style(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    ckpt = args.ckpt or args.ckpt_pos
    if not ckpt:
        parser.error("give the checkpoint: --ckpt PATH")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .checkpoint import calibrate_checkpoint

    try:
        loaded = calibrate_checkpoint(
            ckpt, out_path=args.out, num_samples=args.num_samples, batch_size=args.batch_size, device=args.device,
            seed=args.seed, autocast=None if args.autocast == "none" else args.autocast,
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
