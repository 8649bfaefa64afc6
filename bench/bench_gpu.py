"""GPU speed, side by side in one run (issue 9): training and evaluation of the CIFAR-10 UNets at the card's pace.

    python bench/bench_gpu.py [--out bench_gpu.json] [--models ddpm,iddpm] [--only SECTIONS] [--budget-s 330]
    python bench/bench_gpu.py --tiny --out /tmp/bench.json      # CPU smoke run: tiny UNet, a few iterations

For each model (``ddpm``: conf/model/unet_cifar10_ddpm.yaml, 35.7M; ``iddpm``: conf/model/unet_cifar10_iddpm.yaml,
52.5M, the paper's) at 3x32x32, with random weights (speed does not depend on them):

* ``flops``: FLOPs per image of the forward and of a training step (forward + backward), torch.utils.flop_counter;
* ``train_plain``: (a) a plain fp32 eager PyTorch loop, AdamW, MSE on eps, batch 128, torch's default TF32 switches;
* ``train_project``: (b) the project's training step as ``train.py`` runs it: ``DiffusionModule`` (training_step,
  AdamW, EMA, loss window, gradient clipping) in Lightning's ``Trainer.fit`` with the experiment's module and
  trainer settings (``experiment=cifar10_ls``: bf16-mixed, compile auto), synthetic data, a CSV logger; the first
  step (compilation) is timed separately;
* ``forward_fp32_eager``: (c) the network forward in fp32, eager, batch 256, torch's default switches (cuDNN TF32 on,
  matmul TF32 off): what evaluation ran before ``analytic_dpm.accel``;
* ``eval_default`` / ``sample_default``: (d) the forward through ``accel.prepare_eps_model`` at its defaults, and
  ``analytic_dpm.sample()`` (analytic_ddpm, even trajectory, K steps, batch 256) with it, against K network calls;
* ``forward_matrix``: every precision (fp32 = TF32 off, tf32, bf16) x compile (off, default, reduce-overhead), and
  ``bf16-attn`` (bf16 with the UNet's self-attention in bf16 too: ``attention_float32=False``);
* ``fusion``: whether ``torch.compile`` fuses a ResBlock's GroupNorm with the SiLU after it (the generated kernel
  names), i.e. whether a hand-written fused GroupNorm+SiLU kernel could gain anything.

Card: the measured rate of a large bf16 matmul (and tf32 / fp32) gives the fraction of the card each path uses
(training counts forward + backward FLOPs). Compilation seconds (the first call) are reported apart from the
steady-state figures (warm-up calls, then timed calls between CUDA synchronisations, CUDA events).

Time budget: sections run in priority order (the cheap figures of both models first (FLOPs, fp32 eager forward and
training loop, the eager forward matrix), then model by model the project's training step and the evaluation
defaults, then the training-option variants, then the compiled cells of the matrix), and a section that would not
fit in ``--budget-s`` is recorded as skipped, so one unattended run always ends with a table and a JSON file (also
rewritten after every section).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from analytic_dpm import NoiseSchedule, accel, make_trajectory, sample  # noqa: E402

MODELS = {"ddpm": ("unet_cifar10_ddpm", "DDPM CIFAR-10 UNet, 35.7M"),
          "iddpm": ("unet_cifar10_iddpm", "iDDPM CIFAR-10 UNet (the paper's), 52.5M")}
SECTIONS = ("matmul", "flops", "fusion", "train_plain", "train_project", "forward_fp32_eager", "eval_default",
            "sample_default", "forward_matrix")
PRECISIONS = ("fp32", "tf32", "bf16", "bf16-attn")
COMPILES = ("off", "default", "reduce-overhead")


# ------------------------------------------------------------------------------------------- plumbing
class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), float(seconds)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, need: float) -> bool:
        return self.left() >= need


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call in steady state: ``warmup`` calls, then ``iters`` calls between synchronisations."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


@contextlib.contextmanager
def torch_default_switches():
    """Torch's out-of-the-box TF32 switches (matmul TF32 off, cuDNN TF32 on), restored afterwards."""
    state = accel._read_tf32()
    if state[0] == "classic":
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        accel._restore_tf32(state)


def compose(overrides: list[str], out_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides)
    with open_dict(cfg):
        for key in ("root_dir", "data_dir", "log_dir", "output_dir", "work_dir"):
            cfg.paths[key] = str(out_dir)
    return cfg


def build_net(model_name: str, channels: int, size: int) -> torch.nn.Module:
    from analytic_dpm.registry import plain
    from analytic_dpm.training.module import build_model

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([f"model={model_name}", "data=gaussian", f"data.channels={channels}",
                       f"data.image_size={size}"], Path(tmp))
    return build_model(plain(cfg.model))


def drop_caches(device: torch.device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- sections
def bench_matmul(device: torch.device, tiny: bool) -> dict[str, Any]:
    n = 256 if tiny else 8192
    iters = 2 if tiny else 30
    out: dict[str, Any] = {"size": n}
    for name, dtype, precision in (("bf16", torch.bfloat16, "fp32"), ("tf32", torch.float32, "tf32"),
                                   ("fp32", torch.float32, "fp32")):
        if tiny and name != "bf16":
            continue
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        with accel.tf32_scope(precision == "tf32"):
            sec = timed(lambda a=a, b=b: a @ b, device, 1 if tiny else 5, iters)
        out[f"{name}_tflops"] = 2 * n**3 / sec / 1e12
        del a, b
    return out


def bench_fusion(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Compile one ResBlock (forward, and forward + backward) and list inductor's kernels: a kernel whose name holds
    both ``group_norm`` and ``silu`` means the GroupNorm's normalisation and the SiLU are one pass over memory."""
    import re

    from torch._inductor.utils import run_and_get_code

    from analytic_dpm.nets.unet import ResBlock

    ch, size, batch = (32, 8, 4) if tiny else (256, 16, 128)
    block = ResBlock(ch, 4 * ch, 0.0).to(device)
    x = torch.randn(batch, ch, size, size, device=device, requires_grad=True)
    emb = torch.randn(batch, 4 * ch, device=device)
    out: dict[str, Any] = {"block": f"ResBlock({ch}), input {batch}x{ch}x{size}x{size}"}
    for label, train in (("forward", False), ("train", True)):
        torch._dynamo.reset()
        block.train(train)

        def call(train=train):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y = block(x, emb)
            if train:
                y.float().square().mean().backward()
            return y

        _, codes = run_and_get_code(torch.compile(call))
        names = sorted(set(re.findall(r"\b((?:triton|cpp)_\w*fused\w*)", "\n".join(codes))))
        fused = [n for n in names if "group_norm" in n and "silu" in n]
        out[label] = {"kernels": names, "group_norm_silu_fused": fused, "fused": bool(fused)}
    torch._dynamo.reset()
    return out


def bench_flops(net: torch.nn.Module, shape, device) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, *shape, device=device)
    t = torch.randint(1, 1001, (2,), device=device)
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        net(x, t)
    net.train()
    with FlopCounterMode(display=False) as trn:
        F.mse_loss(net(x, t), x).backward()
    net.zero_grad(set_to_none=True)
    net.eval()
    return {"forward_per_image": fwd.get_total_flops() / 2, "train_per_image": trn.get_total_flops() / 2}


def bench_train_plain(net, shape, device, batch: int, warmup: int, iters: int) -> dict[str, Any]:
    """(a) the baseline: fp32 eager, AdamW, MSE on eps, torch's default TF32 switches."""
    sched = NoiseSchedule.linear(1000)
    sqrt_abar = sched.alphas_cumprod.sqrt().float().to(device)
    sqrt_bbar = sched.bbar.sqrt().float().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x0 = torch.rand(batch, *shape, device=device) * 2 - 1
    net.train()

    def step():
        t = torch.randint(1, 1001, (batch,), device=device)
        eps = torch.randn_like(x0)
        x_t = sqrt_abar[t].view(-1, 1, 1, 1) * x0 + sqrt_bbar[t].view(-1, 1, 1, 1) * eps
        loss = F.mse_loss(net(x_t, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch_default_switches():
        sec = timed(step, device, warmup, iters)
    net.zero_grad(set_to_none=True)
    net.eval()
    return {"images_per_s": batch / sec, "batch": batch, "iters": iters,
            "how": "plain PyTorch loop: fp32 eager, AdamW, MSE on eps, torch's default TF32 switches"}


def bench_train_project(model_name: str, shape, device, batch: int, warmup: int, iters: int, tiny: bool,
                        out_dir: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """(b) DiffusionModule in Lightning's Trainer.fit with the experiment's module and trainer settings."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger

    from analytic_dpm.registry import plain
    from analytic_dpm.training.data import ReproducibleDataModule
    from analytic_dpm.training.module import DiffusionModule

    steps = warmup + iters + 1  # + the first (compiling) step
    over = [f"model={model_name}", "data=gaussian", f"data.channels={shape[0]}", f"data.image_size={shape[1]}",
            f"data.num_train={batch * steps}", "data.num_test=16", f"data.batch_size={batch}",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            f"trainer.max_steps={steps}", "trainer.log_every_n_steps=10", "callbacks=none", "logger=none", *extra]
    over = (["experiment=quickstart", "trainer=cpu"] if tiny else ["experiment=cifar10_ls"]) + over
    cfg = compose(over, out_dir)
    config = plain(cfg)
    mod_cfg = dict(config["module"])
    mod_cfg.pop("_target_", None)
    module = DiffusionModule(model=config["model"], schedule=config["diffusion"]["schedule"],
                             N=int(config["diffusion"]["N"]), seed=0, config=config, **mod_cfg)
    datamodule = ReproducibleDataModule(instantiate(cfg.data), seed=0)

    marks: dict[str, float] = {}

    class StepTimer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            sync(device)
            marks["start"] = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            if trainer.global_step == 1 + warmup:
                sync(device)
                marks["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            if trainer.global_step == 1:
                sync(device)
                marks["first"] = time.perf_counter()
            if trainer.global_step == steps:
                sync(device)
                marks["t1"] = time.perf_counter()

    trainer_kwargs = {k: v for k, v in config["trainer"].items() if k != "_target_"}
    trainer_kwargs["default_root_dir"] = str(out_dir)
    trainer_kwargs["enable_checkpointing"] = False  # train.py's checkpoints happen at epoch ends, outside the timing
    trainer = L.Trainer(**trainer_kwargs, callbacks=[StepTimer()], logger=CSVLogger(str(out_dir / "csv")))
    prev = torch.get_float32_matmul_precision()
    if config.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(str(config["float32_matmul_precision"]))  # as train.py does
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        torch.set_float32_matmul_precision(prev)
    sec = (marks["t1"] - marks["t0"]) / iters
    res = {"images_per_s": batch / sec, "batch": batch, "iters": iters,
           "first_step_s": marks["first"] - marks["start"], "compile_s": module.compile_seconds,
           "compiled": module._compiled_forward is not None,
           "precision": str(trainer.precision), "compile_setting": str(mod_cfg.get("compile")),
           "overrides": list(extra),
           "how": "Lightning Trainer.fit: DiffusionModule (training_step, AdamW, EMA, loss window, grad clipping) "
                  f"with the {'quickstart + trainer=cpu' if tiny else 'cifar10_ls'} experiment's module/trainer "
                  "settings, synthetic data, CSV logger every 10 steps (the experiments log every 100)"}
    del module, trainer, datamodule
    return res


def first_call_seconds(fn, shape, device, batch: int) -> float:
    """Wall seconds of the first call (where compilation happens), kept out of the steady-state figures."""
    x = torch.randn(batch, *shape, device=device)
    t = torch.randint(1, 1001, (batch,), device=device)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        fn(x, t)
        sync(device)
    return time.perf_counter() - t0


def bench_forward(fn, shape, device, batch: int, warmup: int, iters: int) -> dict[str, Any]:
    x = torch.randn(batch, *shape, device=device)
    t = torch.randint(1, 1001, (batch,), device=device)
    with torch.no_grad():
        sec = timed(lambda: fn(x, t), device, warmup, iters)
    return {"images_per_s": batch / sec, "batch": batch, "iters": iters, "seconds_per_call": sec}


def prepared_cell(net, precision: str, compile_label: str, shape, device, batch, warmup, iters) -> dict[str, Any]:
    """One cell of the forward matrix; ``precision`` ``bf16-attn``: bf16 with the self-attention in bf16 too."""
    from analytic_dpm.nets import set_attention_float32

    drop_caches(device)
    mode = None if compile_label in ("off", "default") else compile_label
    attention_bf16 = precision == "bf16-attn"
    prepared = accel.prepare_eps_model(net, precision="bf16" if attention_bf16 else precision,
                                       compile=compile_label != "off", device=device, static_batch=batch, mode=mode)
    set_attention_float32(net, not attention_bf16)
    try:
        first = first_call_seconds(prepared, shape, device, batch)
        res = bench_forward(prepared, shape, device, batch, warmup, iters)
    finally:
        set_attention_float32(net, True)
    res.update(precision=precision, compile=compile_label, first_call_s=first, record=prepared.record())
    res["compile_s"] = prepared.compile_seconds if prepared.compiled else None
    return res, prepared


def bench_sample(prepared, shape, device, batch: int, K: int, net_seconds: float) -> dict[str, Any]:
    sched = NoiseSchedule.linear(1000)
    abar, bbar = sched.alphas_cumprod, sched.bbar
    gamma = bbar / (abar * 0.25 + bbar)  # the Gaussian (std 0.5) Gamma: plausible values, cost does not depend on it
    gamma[0] = 0
    traj = make_trajectory("even", 1000, K)
    best = math.inf
    for rep in range(2):
        gen = torch.Generator(device=device).manual_seed(rep)
        sync(device)
        t0 = time.perf_counter()
        sample(prepared, sched, traj, "analytic_ddpm", (batch, *shape), gamma=gamma, generator=gen, device=device)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    network = K * net_seconds
    return {"K": K, "batch": batch, "seconds": best, "images_per_s": batch / best, "network_seconds": network,
            "overhead_vs_network": best / network - 1.0, "method": "analytic_ddpm", "trajectory": "even"}


# ------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny UNet, small batches, few iterations")
    ap.add_argument("--models", default="ddpm,iddpm", help="comma list of: ddpm, iddpm")
    ap.add_argument("--only", default="", help=f"comma list of sections: {', '.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting sections after this many seconds")
    ap.add_argument("--K", type=int, default=None, help="sampling steps of sample_default (default 100; tiny 3)")
    ap.add_argument("--compile-cpu", action="store_true", help="also compile on a CPU (slow: minutes per cell)")
    ap.add_argument("--compile-guess-s", type=float, default=None,
                    help="seconds to reserve for a compiled cell before the first compile is measured")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        ap.error(f"unknown --only sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")

    def want(section: str) -> bool:
        return not only or section in only

    if args.tiny:
        models = {"tiny": ("unet_tiny", "unet_tiny (smoke test)")}
        shape, train_batch, fwd_batch, warm, iters, K = (3, 8, 8), 4, 8, 1, 2, args.K or 3
    else:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in names if m not in MODELS]
        if bad:
            ap.error(f"unknown --models {bad}; choose from {', '.join(MODELS)}")
        models = {m: MODELS[m] for m in names}
        shape, train_batch, fwd_batch, warm, iters, K = (3, 32, 32), 128, 256, 5, 20, args.K or 100
    can_compile = device.type == "cuda" or args.compile_cpu
    budget = Budget(args.budget_s)
    out_path = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))

    res: dict[str, Any] = {
        "meta": {"device": device.type, "card": torch.cuda.get_device_name(device) if device.type == "cuda" else
                 (platform.processor() or platform.machine()), "torch": torch.__version__,
                 "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                 "python": platform.python_version(), "argv": sys.argv[1:], "tiny": args.tiny,
                 "budget_s": args.budget_s, "threads": torch.get_num_threads(),
                 "accel_defaults": {"precision": "fp32", "compile": "auto", "mode": None},
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")},
        "matmul": {}, "models": {}, "skipped": [], "errors": [], "table": [],
    }

    def save() -> None:
        res["meta"]["elapsed_s"] = round(time.perf_counter() - budget.start, 1)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2, default=str))
        os.replace(tmp, out_path)

    def run(label: str, need_s: float, fn):
        """Run one section within the budget; never let one failure stop the run."""
        if not budget.allows(need_s):
            res["skipped"].append(f"{label}: time budget ({budget.left():.0f}s left, needs ~{need_s:.0f}s)")
            return {"skipped": "time budget"}
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - record and go on
            res["errors"].append(f"{label}: {type(e).__name__}: {e}")
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {e}"}
        print(f"[{time.perf_counter() - budget.start:6.1f}s] {label} ({time.perf_counter() - t0:.1f}s)", flush=True)
        save()
        return out

    # precompute the defaults of prepare_eps_model (so the bench follows them if they change)
    import inspect

    sig = inspect.signature(accel.prepare_eps_model).parameters
    defaults = {k: sig[k].default for k in ("precision", "compile", "mode")}
    res["meta"]["accel_defaults"] = defaults
    default_compile = accel.resolve_settings(device=device, precision=defaults["precision"],
                                             compile=defaults["compile"], mode=defaults["mode"])
    default_cell = (default_compile.precision, default_compile.compile_label)

    if want("matmul"):
        res["matmul"] = run("matmul", 10, lambda: bench_matmul(device, args.tiny))
    peak = res["matmul"].get("bf16_tflops") if isinstance(res["matmul"], dict) else None

    if want("fusion") and can_compile:
        res["fusion"] = run("fusion", 30 if device.type == "cuda" else 60, lambda: bench_fusion(device, args.tiny))
    elif want("fusion"):
        res["fusion"] = {"skipped": f"no compile on {device.type} (pass --compile-cpu)"}

    nets: dict[str, torch.nn.Module] = {}
    # seconds a compiled cell needs (first guess; updated from the measured compiles)
    compile_cost = args.compile_guess_s or (90.0 if device.type == "cuda" else 300.0)

    # phase 1: cheap and key figures of every model
    def phase1(key: str, model_name: str, title: str) -> None:
        nonlocal compile_cost
        net = build_net(model_name, shape[0], shape[1]).to(device).eval()
        nets[key] = net
        m: dict[str, Any] = {"title": title, "config": f"conf/model/{model_name}.yaml",
                             "parameters": sum(p.numel() for p in net.parameters()), "shape": list(shape),
                             "forward_matrix": []}
        res["models"][key] = m
        if want("flops"):
            m["flops"] = run(f"{key}/flops", 10, lambda: bench_flops(net, shape, device))
        if want("forward_fp32_eager"):
            def fwd_eager():
                with torch_default_switches():
                    return bench_forward(net, shape, device, fwd_batch, warm, iters)
            m["forward_fp32_eager"] = run(f"{key}/forward_fp32_eager", 10, fwd_eager)
        if want("train_plain"):
            m["train_plain"] = run(f"{key}/train_plain", 15,
                                   lambda: bench_train_plain(net, shape, device, train_batch, warm, iters))
        if want("forward_matrix"):
            for p in PRECISIONS:
                cell = run(f"{key}/forward {p} eager", 10,
                           lambda p=p: prepared_cell(net, p, "off", shape, device, fwd_batch, warm, iters)[0])
                m["forward_matrix"].append({"precision": p, "compile": "off", **cell})
        drop_caches(device)

    for key, (model_name, title) in models.items():
        phase1(key, model_name, title)

    def phase2_eval(key: str) -> None:
        """(d) the evaluation forward and sample() at the accel defaults (compiles on a GPU)."""
        nonlocal compile_cost
        if not (want("eval_default") or want("sample_default")):
            return
        net, m = nets[key], res["models"][key]

        def eval_and_sample():
            drop_caches(device)
            prepared = accel.prepare_eps_model(net, device=device)
            first = first_call_seconds(prepared, shape, device, fwd_batch)
            cell = bench_forward(prepared, shape, device, fwd_batch, warm, iters)
            cell.update(settings=prepared.settings.as_dict(), record=prepared.record(), first_call_s=first,
                        compile_s=prepared.compile_seconds if prepared.compiled else None)
            smp = bench_sample(prepared, shape, device, fwd_batch, K, cell["seconds_per_call"]) \
                if want("sample_default") else {"skipped": "--only"}
            return cell, smp

        out = run(f"{key}/eval_default + sample_default", compile_cost if default_compile.compile else 10,
                  eval_and_sample)
        if isinstance(out, tuple):
            m["eval_default"], m["sample_default"] = out
            if m["eval_default"].get("compile_s"):
                compile_cost = max(30.0, 1.3 * m["eval_default"]["compile_s"])
            if want("forward_matrix") and default_cell[1] != "off":
                m["forward_matrix"].append({"precision": default_cell[0], "compile": default_cell[1],
                                            "same_as": "eval_default", **m["eval_default"]})
        else:
            m["eval_default"] = m["sample_default"] = out
        drop_caches(device)

    # phase 2, model by model: the project's training step (compiles forward + backward on a GPU), then (d)
    for key, (model_name, _) in models.items():
        if want("train_project"):
            need = 2 * compile_cost if device.type == "cuda" else 20
            res["models"][key]["train_project"] = run(
                f"{key}/train_project", need,
                lambda model_name=model_name, key=key: bench_train_project(
                    model_name, shape, device, train_batch, warm, iters, args.tiny, work / key))
            drop_caches(device)
        phase2_eval(key)

    # phase 2b: the training options that wait for evidence (DDPM model only): bf16 attention, channels_last, and
    # the multi-tensor AdamW against the default fused one (auto: fused on CUDA)
    if want("train_project"):
        key = next(iter(models))
        variants = {"attention bf16": ("module.attention_float32=false",),
                    "channels_last": ("module.channels_last=true",),
                    "AdamW foreach": ("module.fused_optimizer=false",)}
        res["models"][key]["train_project_variants"] = found = {}
        for label, extra in variants.items():
            need = 2 * compile_cost if device.type == "cuda" else 20
            found[label] = run(f"{key}/train_project + {label}", need,
                               lambda extra=extra, label=label: bench_train_project(
                                   models[key][0], shape, device, train_batch, warm, iters, args.tiny,
                                   work / f"{key}-{label.replace(' ', '_')}", extra))
            drop_caches(device)

    # phase 3: the compiled cells of the forward matrix, most useful first
    if want("forward_matrix"):
        order = [("bf16", "default"), ("bf16-attn", "default"), ("bf16", "reduce-overhead"),
                 ("bf16-attn", "reduce-overhead"), ("fp32", "default"), ("tf32", "default"),
                 ("fp32", "reduce-overhead"), ("tf32", "reduce-overhead")]
        for p, c in order:
            for key in models:
                m = res["models"][key]
                if any(cell["precision"] == p and cell["compile"] == c for cell in m["forward_matrix"]):
                    continue
                if not can_compile:
                    m["forward_matrix"].append({"precision": p, "compile": c,
                                                "skipped": f"no compile on {device.type} (pass --compile-cpu)"})
                    continue
                cell = run(f"{key}/forward {p} {c}", compile_cost,
                           lambda key=key, p=p, c=c: prepared_cell(nets[key], p, c, shape, device, fwd_batch, warm,
                                                                  iters)[0])
                m["forward_matrix"].append({"precision": p, "compile": c, **cell})
                if cell.get("compile_s"):
                    compile_cost = max(compile_cost * 0.5, 30.0, 1.3 * cell["compile_s"]) \
                        if device.type == "cuda" else compile_cost
                drop_caches(device)

    # derived figures and the table
    for key, m in res["models"].items():
        flops = m.get("flops") or {}
        base_train = (m.get("train_plain") or {}).get("images_per_s")
        base_fwd = (m.get("forward_fp32_eager") or {}).get("images_per_s")
        rows = [("train: plain fp32 eager loop (a)", m.get("train_plain"), base_train, "train"),
                ("train: project, train.py setup (b)", m.get("train_project"), base_train, "train"),
                *[(f"train: project + {k}", v, base_train, "train")
                  for k, v in (m.get("train_project_variants") or {}).items()],
                ("forward: fp32 eager, torch defaults (c)", m.get("forward_fp32_eager"), base_fwd, "forward"),
                ("forward: accel defaults (d)", m.get("eval_default"), base_fwd, "forward")]
        rows += [(f"forward: {c['precision']} / compile {c['compile']}", c, base_fwd, "forward")
                 for c in m.get("forward_matrix", [])]
        for label, r, base, kind in rows:
            if not isinstance(r, dict):
                continue
            ips = r.get("images_per_s")
            per_image = flops.get("train_per_image" if kind == "train" else "forward_per_image")
            row = {"model": key, "path": label, "images_per_s": ips,
                   "vs_baseline": ips / base if ips and base else None,
                   "tflops": ips * per_image / 1e12 if ips and per_image else None,
                   "compile_s": r.get("compile_s"), "note": r.get("skipped") or r.get("error")}
            row["fraction_of_bf16_matmul"] = row["tflops"] / peak if row["tflops"] and peak else None
            if ips:
                r.update(vs_baseline=row["vs_baseline"], tflops=row["tflops"],
                         fraction_of_bf16_matmul=row["fraction_of_bf16_matmul"])
            res["table"].append(row)
        s = m.get("sample_default")
        if isinstance(s, dict) and s.get("images_per_s"):
            res["table"].append({"model": key, "path": f"sample(): analytic_ddpm K={s['K']} (d)",
                                 "images_per_s": s["images_per_s"], "vs_baseline": None, "tflops": None,
                                 "compile_s": None, "fraction_of_bf16_matmul": None,
                                 "note": f"sampler overhead vs {s['K']} network calls: "
                                         f"{100 * s['overhead_vs_network']:+.1f}%"})
    save()

    def fmt(v, spec):
        width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
        return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(width)

    card = res["meta"]["card"]
    print(f"\n{card}, torch {torch.__version__}; bf16 matmul {fmt(peak, '.1f')} TFLOP/s "
          f"(tf32 {fmt(res['matmul'].get('tf32_tflops'), '.1f')}, fp32 {fmt(res['matmul'].get('fp32_tflops'), '.1f')})")
    for key, m in res["models"].items():
        fl = m.get("flops") or {}
        gf = {k: fl[k] / 1e9 if isinstance(fl.get(k), (int, float)) else None
              for k in ("forward_per_image", "train_per_image")}
        print(f"{key}: {m['parameters'] / 1e6:.2f}M parameters, {fmt(gf['forward_per_image'], '.2f')} GFLOP/image "
              f"forward, {fmt(gf['train_per_image'], '.2f')} GFLOP/image training step")
    head = (f"{'model':6s} {'path':44s} {'images/s':>10s} {'vs base':>8s} {'TFLOP/s':>8s} {'% bf16':>7s} "
            f"{'compile s':>9s}")
    print(head)
    print("-" * len(head))
    for r in res["table"]:
        frac = r["fraction_of_bf16_matmul"]
        print(f"{r['model']:6s} {r['path'][:44]:44s} {fmt(r['images_per_s'], '10.0f')} {fmt(r['vs_baseline'], '8.2f')} "
              f"{fmt(r['tflops'], '8.1f')} {fmt(frac * 100 if frac else None, '7.1f')} {fmt(r['compile_s'], '9.1f')}"
              f"{'  ' + r['note'] if r.get('note') else ''}")
    fusion = res.get("fusion") or {}
    for label in ("forward", "train"):
        if isinstance(fusion.get(label), dict):
            f = fusion[label]
            print(f"fusion ({label}, {fusion['block']}): GroupNorm+SiLU fused: {f['fused']} "
                  f"({', '.join(f['group_norm_silu_fused']) or 'no such kernel'}; {len(f['kernels'])} kernels)")
    if res["skipped"]:
        print(f"\nskipped ({len(res['skipped'])}): " + "; ".join(res["skipped"]))
        print("rerun the rest, e.g.: python bench/bench_gpu.py --only forward_matrix --out bench_gpu_rest.json")
    if res["errors"]:
        print("\nerrors: " + "; ".join(res["errors"]))
    print(f"\nwrote {out_path} ({res['meta']['elapsed_s']:.0f}s)")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
