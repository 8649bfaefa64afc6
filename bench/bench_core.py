"""Micro-benchmarks of the Analytic-DPM core: the optimal-trajectory DP, NLL and Gamma throughput.

    python bench/bench_core.py [--device cuda] [--out bench_core.json]

Prints a table and writes the figures as JSON. Uses the exact Gaussian oracle as eps_model, so the
NLL/Gamma figures measure the library's own overhead (the network is free).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from analytic_dpm import NoiseSchedule, estimate_gamma, make_trajectory, nll_bpd
from analytic_dpm.oracles import GaussianOracle


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench_core.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "device": str(dev), "torch": torch.__version__}

    sched = NoiseSchedule.linear(1000)
    oracle = GaussianOracle(sched, 0.0, 0.5, (3, 32, 32))
    gamma = (oracle.gamma() * 0.95).to(dev)  # a non-degenerate cost (the exact Gaussian gamma makes every path tie)
    gamma[0] = 0
    for K in (10, 100, 333, 1000):
        sec = timed(lambda K=K: make_trajectory("optimal", 1000, K, gamma, schedule=sched), repeat=1)
        results[f"dp_N1000_K{K}_s"] = sec
        print(f"optimal-trajectory DP  N=1000 K={K:<5d} {sec:8.3f} s")

    x0 = oracle.sample_data(256).to(dev)
    traj = make_trajectory("even", 1000, 100)
    g = oracle.gamma()
    sec = timed(lambda: nll_bpd(oracle, sched, traj, x0, ["ddpm_beta", "ddpm_beta_tilde", "analytic_ddpm"],
                                gamma=g, batch_size=1024), repeat=2)
    results["nll_evals_per_s"] = 256 * 100 / sec
    print(f"NLL (3 methods, CIFAR-shaped, oracle) {256 * 100 / sec:10.0f} (image, step) evaluations/s")

    pool = oracle.sample_data(1024)
    sec = timed(lambda: estimate_gamma(oracle, sched, pool, 4, 1000, progress=False, device=dev), repeat=2)
    results["gamma_evals_per_s"] = 4000 / sec
    print(f"Gamma calibration (CIFAR-shaped, oracle) {4000 / sec:10.0f} evaluations/s")

    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
