"""The sampling cost of a covariance-head method as a ratio to analytic_ddpm at the same K (spec section 11).

    python bench/bench_head_sampling.py [--K 10 100] [--batch 250] [--repeat 5] [--kind npr] [--mode simple]
                                        [--net small|cifar10] [--device cpu] [--out FILE.json]

The head shares the backbone's forward pass (it reads the decoder's last feature map), so a head method should cost
the backbone's K forwards plus the small head and the per-pixel variance arithmetic: the issue's goal is within 5%.
Both are timed in this process on the quickstart UNet (``conf/model/unet_small.yaml`` at 1x28x28) or, with
``--net cifar10``, DDPM's CIFAR-10 UNet (35.7M, 3x32x32), random weights (the cost does not depend on them), with
a head (``--kind``, ``--mode``; default a simple NPR head): ``analytic_ddpm`` with the plain backbone (what one runs
without a head) against the head's DDPM method with the head model, alternating, the median of ``--repeat`` runs
each, the same noise. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from analytic_dpm import NoiseSchedule, make_trajectory, sample
from analytic_dpm.nets import UNet
from analytic_dpm.nets.heads import HeadUNet

NETS = {
    # the quickstart UNet (conf/model/unet_small.yaml) at Fashion-MNIST's 1x28x28
    "small": dict(in_channels=1, image_size=28, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(), dropout=0.1),
    # DDPM's CIFAR-10 UNet (conf/model/unet_cifar10_ddpm.yaml, 35.7M) at 3x32x32: the paper's size
    "cifar10": dict(in_channels=3, image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attention_resolutions=(16,), dropout=0.1),
}


def build(device, kind="npr", mode="simple", net="small"):
    torch.manual_seed(0)
    unet = UNet(**NETS[net])
    head = HeadUNet(unet, kind, mode, zero_init=False).to(device).eval()
    return head.eps_model, head


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--K", type=int, nargs="+", default=[10, 100])
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--kind", default="npr", choices=("sn", "npr"))
    p.add_argument("--mode", default="simple", choices=("simple", "complex"),
                   help="the head: simple (the authors' default) or complex (a ResBlock first; the quickstart's)")
    p.add_argument("--net", default="small", choices=sorted(NETS),
                   help="small: the quickstart UNet at 1x28x28; cifar10: DDPM's CIFAR-10 UNet at 3x32x32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backbone, head_model = build(device, args.kind, args.mode, args.net)
    size = NETS[args.net]
    sched = NoiseSchedule.linear(1000)
    gamma = torch.cat([torch.zeros(1), torch.linspace(0.05, 0.95, 1000)]).double()  # any valid Gamma: cost only
    shape = (args.batch, size["in_channels"], size["image_size"], size["image_size"])
    rows = []
    for K in args.K:
        taus = make_trajectory("even", 1000, K)
        runs = {
            "analytic_ddpm (backbone)": lambda taus=taus: sample(
                backbone, sched, taus, "analytic_ddpm", shape, gamma=gamma,
                generator=torch.Generator().manual_seed(0), device=device),
            f"{args.kind}_ddpm (head model)": lambda taus=taus: sample(
                head_model, sched, taus, f"{args.kind}_ddpm", shape, generator=torch.Generator().manual_seed(0),
                device=device),
        }
        with torch.no_grad():
            for fn in runs.values():  # warm-up
                fn()
            times = {name: [] for name in runs}
            for _ in range(args.repeat):
                for name, fn in runs.items():
                    times[name].append(timed(fn, device))
        base, head = (statistics.median(times[n]) for n in runs)
        rows.append({"K": K, "batch": args.batch, "net": args.net, "head": f"{args.kind}:{args.mode}",
                     "analytic_ddpm_s": base, "head_method_s": head, "ratio": head / base, "times": times})
        print(f"K={K:4d} batch {args.batch}: analytic_ddpm {base:.3f} s, "
              f"{args.kind}_ddpm ({args.mode} head) {head:.3f} s, ratio {head / base:.3f}", flush=True)
    res = {"device": str(device), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
