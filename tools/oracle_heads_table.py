"""The oracle figures of docs/heads.md: NELBO (bits/dim) of the exact covariance heads against analytic_ddpm.

    python tools/oracle_heads_table.py [--images 2048] [--K 2 5 10 25 50 100]

Anisotropic Gaussian (16 per-pixel stds 0.02..1, mean 0.1): sn_ddpm / npr_ddpm with exact heads against -log q(x_0)
and analytic_ddpm with the exact gamma. Gaussian mixture (conf/model/oracle_gmm.yaml): the exact heads against
analytic_ddpm with a Monte-Carlo gamma (M = 200). Continuous decoder with each method's own decoder variance, even
trajectory, one network pass and the same noise for all methods of a K. The same settings as tests/test_heads_nll.py.
"""

from __future__ import annotations

import argparse
import math

import torch

from analytic_dpm import NoiseSchedule, estimate_gamma, make_trajectory, nll_bpd
from analytic_dpm.oracles import GaussianMixtureOracle, GaussianOracle

SHAPE = (1, 4, 4)
CONTINUOUS = dict(decoder="continuous", decoder_variance="method", clip_x0=False)


def table(name, oracle, gamma, x0, exact, Ks, data_range):
    print(f"\n{name}" + ("" if exact is None else f": -log q(x_0) = {exact.mean():.4f} bits/dim"))
    print("| K | sn_ddpm | npr_ddpm | analytic_ddpm |\n|---|---:|---:|---:|")
    for K in Ks:
        traj = make_trajectory("even", 1000, K)
        row = {}
        for kind in ("sn", "npr"):
            bpd = nll_bpd(oracle.head_model(kind), oracle.schedule, traj, x0, [f"{kind}_ddpm", "analytic_ddpm"],
                          gamma=gamma, batch_size=16384, generator=torch.Generator().manual_seed(K),
                          data_range=data_range, **CONTINUOUS)
            row[kind] = bpd[f"{kind}_ddpm"].mean().item()
            row["analytic"] = bpd["analytic_ddpm"].mean().item()
        print(f"| {K} | {row['sn']:.4f} | {row['npr']:.4f} | {row['analytic']:.4f} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--K", type=int, nargs="+", default=[2, 5, 10, 25, 50, 100])
    args = ap.parse_args(argv)
    sched = NoiseSchedule.linear(1000)
    std = torch.logspace(math.log10(0.02), math.log10(1.0), 16).reshape(SHAPE)
    aniso = GaussianOracle(sched, mean=0.1, std=std, shape=SHAPE)
    x0 = aniso.sample_data(args.images, torch.Generator().manual_seed(0))
    exact = -aniso.log_prob(x0) / (16 * math.log(2))
    table("anisotropic Gaussian (exact gamma)", aniso, aniso.gamma(), x0, exact, args.K, None)
    mix = GaussianMixtureOracle(sched, means=[-0.4, 0.4], stds=[0.25, 0.2], weights=[0.4, 0.6], shape=SHAPE)
    gamma = estimate_gamma(mix, sched, mix.sample_data, 200, 50000, generator=torch.Generator().manual_seed(1),
                           progress=False)
    x0 = mix.sample_data(args.images, torch.Generator().manual_seed(2))
    table("Gaussian mixture (gamma: M = 200)", mix, gamma, x0, None, args.K, (-1.0, 1.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
