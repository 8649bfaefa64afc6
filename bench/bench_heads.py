"""The training cost of a covariance head (spec section 11) as a ratio to the backbone's own training step.

    python bench/bench_heads.py --ckpt outputs/demo/train/checkpoints/last.ckpt [--kind npr] [--mode simple]
                                [--batch-size 64] [--steps 20] [--device cpu] [--precision 32-true] [--out heads.json]

One process, one machine, one network: the backbone step is :class:`~analytic_dpm.training.DiffusionModule`'s (the
checkpoint's network and schedule: forward, backward through the whole UNet, AdamW, EMA), the head step is
:class:`~analytic_dpm.training.HeadModule`'s on that checkpoint (one forward of the frozen backbone without autograd,
forward and backward of the head only, AdamW and EMA of the head). Both run the module's own ``training_step`` on the
same random batch of the backbone's image shape, then ``backward``, the optimizer step and the EMA update, as
Lightning does (Lightning's own per-step overhead is the same for both and left out). The steps alternate (backbone,
head, backbone, ...) after ``--warmup`` untimed steps of each, so a machine whose load changes (a shared CPU) slows both
alike; the figure is the ratio of the median step times. ``--precision bf16-mixed`` runs both under bf16 autocast.

Prints the figures and writes them as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout without installing

from analytic_dpm.files import safe_torch_load  # noqa: E402
from analytic_dpm.training import DiffusionModule, HeadModule  # noqa: E402
from analytic_dpm.training.backbone import load_backbone  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """One Lightning-like training step of a module: training_step, backward, AdamW step, EMA update."""

    def __init__(self, module, device: torch.device, autocast):
        self.module = module.to(device)
        self.module.train()
        opt = module.configure_optimizers()
        self.opt = opt["optimizer"] if isinstance(opt, dict) else opt
        self.autocast = autocast
        self.times: list[float] = []

    def step(self, batch: torch.Tensor, device: torch.device, record: bool) -> None:
        sync(device)
        t0 = time.perf_counter()
        with self.autocast():
            loss = self.module.training_step(batch, 0)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.module.update_ema()
        sync(device)
        if record:
            self.times.append(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="a backbone training checkpoint of this package")
    ap.add_argument("--kind", default="npr", choices=("sn", "npr"))
    ap.add_argument("--mode", default="simple", choices=("simple", "complex"))
    ap.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's data.batch_size")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each module")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each module first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    ckpt = safe_torch_load(Path(args.ckpt), what="checkpoint", mmap=True)
    hp = ckpt["hyper_parameters"]
    batch_size = args.batch_size or int((hp.get("data") or {}).get("batch_size") or 64)
    backbone = load_backbone({"ckpt_path": args.ckpt})
    diffusion = DiffusionModule(hp["model"], schedule=hp["diffusion"]["schedule"], N=int(hp["diffusion"]["N"]),
                                fused_optimizer=False)
    diffusion.eps_model.load_state_dict(backbone.unet.state_dict())
    head = HeadModule(backbone, kind=args.kind, mode=args.mode, fused_optimizer=False)
    if args.precision == "bf16-mixed":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    steppers = {"backbone": Stepper(diffusion, device, autocast), "head": Stepper(head, device, autocast)}
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (batch_size, *backbone.image_shape), generator=gen, dtype=torch.uint8).to(device)
    for i in range(args.warmup + args.steps):
        for s in steppers.values():
            s.step(batch, device, record=i >= args.warmup)
    med = {name: statistics.median(s.times) for name, s in steppers.items()}
    ratio = med["head"] / med["backbone"]
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "device": str(device), "torch": torch.__version__, "precision": args.precision,
        "checkpoint": str(args.ckpt), "image_shape": list(backbone.image_shape), "batch_size": batch_size,
        "backbone_parameters": sum(p.numel() for p in backbone.unet.parameters()),
        "head": {"kind": args.kind, "mode": args.mode, "parameters": head.num_parameters()},
        "steps": args.steps, "warmup": args.warmup,
        "backbone_step_s": med["backbone"], "head_step_s": med["head"], "head_to_backbone_ratio": ratio,
        "backbone_step_s_all": steppers["backbone"].times, "head_step_s_all": steppers["head"].times,
    }  # fmt: skip
    print(f"{results['machine']}, {device}, {args.precision}, batch {batch_size} of {backbone.image_shape}")
    print(f"backbone training step (DiffusionModule, {results['backbone_parameters'] / 1e6:.2f}M trained): "
          f"{med['backbone'] * 1e3:8.1f} ms (median of {args.steps})")
    print(f"head training step ({args.kind}/{args.mode}, {head.num_parameters()} trained on a frozen backbone): "
          f"{med['head'] * 1e3:8.1f} ms")
    print(f"head / backbone step time: {ratio:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
