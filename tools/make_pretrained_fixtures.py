"""Make the pretrained-format test fixtures by running the other projects' own code (outside this package).

    python tools/make_pretrained_fixtures.py \\
        --improved-diffusion /tmp/ext/openai+improved-diffusion \\
        --ddim /tmp/ext/ermongroup+ddim \\
        --pytorch-diffusion /tmp/ext/pesser+pytorch_diffusion \\
        --analytic-dpm /tmp/ext/baofff+Analytic-DPM \\
        --revision improved-diffusion=1bc7bbb... --revision ddim=e8df66c... ...

Each PATH is an extracted copy of that public repository (nothing of it is copied into this one). For every format
the script builds a TINY network with that project's code, gives EVERY parameter random non-zero values (the
output convs those projects zero-initialise included, so the comparison means something), writes the weights in
the format's real on-disk layout with that project's own saving code or structure, and records that project's
network output on fixed inputs, computed along its own loading and sampling path, plus its betas:

- ``improved_diffusion/``: a plain state dict (``torch.save(state_dict)``, as its ``train_util`` does) of
  ``create_model_and_diffusion(**flags)`` with learn_sigma; the output through its ``SpacedDiffusion`` wrapper
  with ``rescale_timesteps`` on and off; ``get_named_beta_schedule`` betas.
- ``analytic_dpm_official/``: the authors' ``CKPT(...).save`` dict (``ema_models_states["eps_model"]``, plus
  different training weights under ``models_states``) of their ``UNetModel``; the output through their
  ``CKPT.load(...).to_ema_models`` and ``core.inference.utils._x_0_pred`` (n in 1..N, no shift, rescaled).
- ``ddpm/``: an ermongroup/ddim training checkpoint (``[DataParallel state dict, optimizer state, epoch, step,
  EMAHelper.state_dict()]``) of ``models.diffusion.Model`` and its YAML config, the output along its ``sample()``
  loading path (EMA applied) with its float timesteps ``i = t - 1``; a pytorch_diffusion plain state dict of its
  ``Model(**kwargs)`` (1 channel, no resampling convs) and its output; ddim's ``get_beta_schedule`` betas.
- ``manifests.json.gz`` (in ``improved_diffusion/`` and ``ddpm/``): the key -> shape lists of the full-size public
  networks the README names (built on the meta device with those projects' code), with the options that load
  them here.

Small files: each weight tensor is an overlapping ``as_strided`` view of a short random storage (``torch.save``
writes the storage, not the expanded tensor), so a network of ~1M parameters takes tens of kB. Along every
axis the entries are distinct random values, so a wrong permutation, concatenation or transposition of any
weight changes the output. Loaders copy these tensors like any other.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gzip
import importlib
import importlib.util
import json
import math
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "pretrained"


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def on_path(path: Path):
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))


def function_from(path: Path, name: str, namespace: dict) -> types.FunctionType:
    """One top-level function of a file, compiled alone (the file's other imports are not run)."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
    exec(code, namespace)  # noqa: S102 - a fetched public repository's own function, run by the fixture maker only
    return namespace[name]


def module_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STRIDES = {1: (1,), 2: (2, 1), 3: (2, 1, 1), 4: (5, 3, 3, 1)}  # kernel 3x3 offsets 3*kh + kw are distinct


def random_states(model: torch.nn.Module, seed: int, count: int = 1) -> list[dict[str, torch.Tensor]]:
    """``count`` random state dicts for ``model`` whose tensors are views of a few shared random storages.

    Values: conv / linear weights ~ N(0, s^2) with s = 1/sqrt(fan_in) rounded to a power of 2; GroupNorm scales
    ~ N(1, 1/64); biases ~ N(0, 1/64). Each (mean, std) class has one storage; each tensor is an overlapping
    ``as_strided`` view of it at its own random offset (distinct within the class), so that every tensor differs
    from every other and each holds distinct values along every axis, while the file stores only the pools.
    """
    gen = torch.Generator().manual_seed(seed)
    plan = []  # (set, key, shape, strides, span, class)
    for index in range(count):
        for key, value in model.state_dict().items():
            shape = tuple(int(d) for d in value.shape)
            if value.ndim >= 2:  # conv / linear weights
                cls = (0.0, 2.0 ** round(math.log2(1.0 / math.sqrt(math.prod(shape[1:])))))
            elif key.endswith("weight"):  # the only 1-D weights are GroupNorm scales
                cls = (1.0, 0.125)
            else:  # biases
                cls = (0.0, 0.125)
            strides = STRIDES[len(shape)]
            span = sum((d - 1) * st for d, st in zip(shape, strides, strict=True)) + 1
            plan.append((index, key, shape, strides, span, cls))
    pools, offsets = {}, {}
    for cls in sorted({p[-1] for p in plan}):
        members = [p for p in plan if p[-1] == cls]
        room = 2 * len(members)  # distinct offsets in [0, room)
        length = room + max(p[4] for p in members)
        pools[cls] = cls[0] + cls[1] * torch.randn(length, generator=gen)
        offsets[cls] = torch.randperm(room, generator=gen)[: len(members)].tolist()
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for index, key, shape, strides, _, cls in plan:
        states[index][key] = pools[cls].as_strided(shape, strides, offsets[cls].pop())
    return states


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    return random_states(model, seed)[0]


def inputs(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    print(f"  wrote {show(path)} ({path.stat().st_size / 1024:.1f} kB)")


def key_shapes(model: torch.nn.Module) -> list:
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def readme(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text).lstrip())
    print(f"  wrote {show(path)}")


# ---------------------------------------------------------------------------------------------------------
# improved-diffusion
# ---------------------------------------------------------------------------------------------------------
IDDPM_TINY = dict(  # flags as its scripts take them; the rest is model_and_diffusion_defaults()
    image_size=32, num_channels=32, num_res_blocks=1, num_heads=4, num_heads_upsample=2,
    attention_resolutions="16,8", dropout=0.1, learn_sigma=True, diffusion_steps=2000, noise_schedule="cosine",
)  # fmt: skip
IDDPM_PUBLIC = {  # the checkpoints the README names -> their flags (improved-diffusion README / Analytic-DPM)
    "imagenet64_uncond_100M_1500K": dict(
        image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True, diffusion_steps=4000,
        noise_schedule="cosine",
    ),
    "analytic_dpm_cifar10_ls": dict(
        image_size=32, num_channels=128, num_res_blocks=3, dropout=0.3, diffusion_steps=1000,
        noise_schedule="linear",
    ),
}  # fmt: skip


def make_iddpm(repo: Path, out: Path, revision: str) -> None:
    print("improved-diffusion")
    with on_path(repo):
        su = importlib.import_module("improved_diffusion.script_util")
        gd = importlib.import_module("improved_diffusion.gaussian_diffusion")
        args = su.model_and_diffusion_defaults()
        args.update(IDDPM_TINY)
        model, diff_rescaled = su.create_model_and_diffusion(**args)
        _, diff_plain = su.create_model_and_diffusion(**{**args, "rescale_timesteps": False})
        state = random_state(model, seed=1)
        save(state, out / "tiny_learn_sigma.pt")  # train_util: th.save(state_dict, f)

        model.load_state_dict(torch.load(out / "tiny_learn_sigma.pt", weights_only=True))  # image_sample.py
        model.eval()
        x = inputs(2, (2, 3, 32, 32))
        t_ours = torch.tensor([1, 2000])  # t - 1 = 0 under both conventions; N - 1 = 1999 vs 999.5 rescaled
        t_theirs = t_ours - 1  # GaussianDiffusion indexes timesteps 0..N-1
        with torch.no_grad():  # p_mean_variance: model(x, self._scale_timesteps(t)) through the SpacedDiffusion wrapper
            out_rescaled = diff_rescaled._wrap_model(model)(x, diff_rescaled._scale_timesteps(t_theirs))
            out_plain = diff_plain._wrap_model(model)(x, diff_plain._scale_timesteps(t_theirs))
        betas = {f"{name}_{n}": torch.from_numpy(gd.get_named_beta_schedule(name, n)) for name, n in
                 [("cosine", 2000), ("linear", 500)]}

        manifests = {}
        for name, flags in IDDPM_PUBLIC.items():
            a = {**su.model_and_diffusion_defaults(), **flags}
            with torch.device("meta"):
                m = su.create_model(
                    a["image_size"], a["num_channels"], a["num_res_blocks"], learn_sigma=a["learn_sigma"],
                    class_cond=a["class_cond"], use_checkpoint=a["use_checkpoint"],
                    attention_resolutions=a["attention_resolutions"], num_heads=a["num_heads"],
                    num_heads_upsample=a["num_heads_upsample"], use_scale_shift_norm=a["use_scale_shift_norm"],
                    dropout=a["dropout"],
                )  # fmt: skip
            manifests[name] = dict(kind="improved_diffusion", options=flags, keys=key_shapes(m),
                                   num_params=sum(p.numel() for p in m.parameters()),
                                   made_with=f"openai/improved-diffusion@{revision} script_util.create_model")
    save(dict(
        flags=IDDPM_TINY, x=x, t=t_ours, t_theirs=t_theirs, out_rescaled=out_rescaled[:, :3].clone(),
        out_plain=out_plain[:, :3].clone(), out_channels=out_rescaled.shape[1],
        betas=betas, made_with=f"openai/improved-diffusion@{revision}",
    ), out / "reference.pt")  # fmt: skip
    return manifests


# ---------------------------------------------------------------------------------------------------------
# Analytic-DPM (official CIFAR-10 layout)
# ---------------------------------------------------------------------------------------------------------
ADPM_TINY = dict(  # their profiles/ddpm/cifar10/base.py unet_model, shrunk (model_channels, num_res_blocks)
    in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=(32 // 16, 32 // 8),
    dropout=0.3, channel_mult=(1, 2, 2, 2), conv_resample=True, dims=2, num_classes=None, use_checkpoint=False,
    num_heads=4, num_heads_upsample=-1, use_scale_shift_norm=True,
)  # fmt: skip
ADPM_FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1, dropout=0.3, diffusion_steps=1000,
                  noise_schedule="linear")  # the improved-diffusion flags of the same network


def make_adpm(repo: Path, out: Path, revision: str, manifests: dict) -> None:
    print("Analytic-DPM")
    code = repo / "cifar_imagenet_codes"
    with on_path(code):
        modules = importlib.import_module("core.modules")
        managers = importlib.import_module("core.utils.managers")
        inference = importlib.import_module("core.inference.utils")
        beta_schedules = importlib.import_module("profiles.ddpm.beta_schedules")
        criterions = importlib.import_module("core.criterions.ddpm")
        ckpt = module_from(code / "interface" / "utils" / "ckpt.py", "adpm_ckpt")  # its package imports tensorboard

        model = modules.UNetModel(**ADPM_TINY)
        ema_state, train_state = random_states(model, seed=3, count=2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0001, weight_decay=0.0)
        ckpt.CKPT(it=1, best_val_loss=None, models_states={"eps_model": train_state},
                  optimizers_states={"all": optimizer.state_dict()}, lr_schedulers_states={},
                  ema_models_states={"eps_model": ema_state}).save(str(out / "cifar10_tiny.ckpt.pth"))
        print(f"  wrote {show(out / 'cifar10_tiny.ckpt.pth')}")

        # interface/runner/runner.py run_evaluate_profile: models, then CKPT().load(path).to_ema_models(models)
        models = managers.ModelsManager(eps_model=modules.UNetModel(**ADPM_TINY))
        ckpt.CKPT().load(str(out / "cifar10_tiny.ckpt.pth")).to_ema_models(models)
        models.eval()
        betas = np.append(0.0, beta_schedules.get_named_beta_schedule("linear", 1000))  # run_cifar10.py settings
        _, cum_alphas, _ = criterions._make_coeff(betas)
        x = inputs(5, (1, 3, 32, 32))
        ns = [1, 700, 1000]
        with torch.no_grad():  # reverse_ddpm / nelbo: _x_0_pred(x, n, cum_alphas, rescale_timesteps=True), shift1 False
            eps = torch.stack([inference._x_0_pred(x, n, cum_alphas, True, eps_model=models.eps_model)[1] for n in ns])
        with torch.device("meta"):
            full = modules.UNetModel(**{**ADPM_TINY, "model_channels": 128, "num_res_blocks": 3})  # base.py, full size
        manifests["analytic_dpm_cifar10"] = dict(
            kind="improved_diffusion", options=IDDPM_PUBLIC["analytic_dpm_cifar10_ls"], keys=key_shapes(full),
            num_params=sum(p.numel() for p in full.parameters()),
            made_with=f"baofff/Analytic-DPM@{revision} profiles/ddpm/cifar10/base.py unet_model",
        )  # fmt: skip
    save(dict(flags=ADPM_FLAGS, x=x, n=torch.tensor(ns), eps=eps, betas=torch.from_numpy(betas[1:]),
              made_with=f"baofff/Analytic-DPM@{revision}"), out / "reference.pt")


# ---------------------------------------------------------------------------------------------------------
# DDPM / DDIM
# ---------------------------------------------------------------------------------------------------------
DDIM_TINY_YAML = """\
# an ermongroup/ddim-style config (its data / model / diffusion sections) of a tiny random-weight network
data:
    dataset: "CELEBA"
    image_size: 16
    channels: 3

model:
    type: "simple"
    in_channels: 3
    out_ch: 3
    ch: 32
    ch_mult: [1, 2, 2]
    num_res_blocks: 1
    attn_resolutions: [8, ]
    dropout: 0.1
    var_type: fixedlarge
    ema_rate: 0.9999
    ema: True
    resamp_with_conv: True

diffusion:
    beta_schedule: linear
    beta_start: 0.0001
    beta_end: 0.02
    num_diffusion_timesteps: 1000

training:
    batch_size: 16

optim:
    optimizer: "Adam"
    lr: 0.0002
    weight_decay: 0.0
    beta1: 0.9
    amsgrad: false
    eps: 0.00000001
"""
PESSER_TINY = dict(resolution=16, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(16,), dropout=0.0, resamp_with_conv=False)
DDPM_PUBLIC = {  # ddim configs/celeba.yml; pytorch_diffusion Diffusion.from_pretrained lsun_cfg / cifar10_cfg
    "ddim_celeba64": dict(
        resolution=64, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 2, 2, 4], num_res_blocks=2,
        attn_resolutions=[16], dropout=0.1, resamp_with_conv=True, beta_schedule="linear", beta_start=0.0001,
        beta_end=0.02, num_diffusion_timesteps=1000,
    ),
    "pesser_lsun_bedroom": dict(
        resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2,
        attn_resolutions=[16], dropout=0.0, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
        num_diffusion_timesteps=1000,
    ),
    "pesser_cifar10": dict(
        resolution=32, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2,
        attn_resolutions=[16], dropout=0.1, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
        num_diffusion_timesteps=1000,
    ),
}  # fmt: skip


def make_ddim(repo: Path, out: Path, revision: str, manifests: dict) -> None:
    print("ddim")
    import yaml

    (out / "ddim_tiny.yml").write_text(DDIM_TINY_YAML)
    print(f"  wrote {show(out / 'ddim_tiny.yml')}")
    with on_path(repo):
        diffusion = importlib.import_module("models.diffusion")
        ema = importlib.import_module("models.ema")
        get_optimizer = importlib.import_module("functions").get_optimizer
        ns: dict = {"np": np, "argparse": argparse}
        dict2namespace = function_from(repo / "main.py", "dict2namespace", ns)
        get_beta_schedule = function_from(repo / "runners" / "diffusion.py", "get_beta_schedule", ns)

        config = dict2namespace(yaml.safe_load(DDIM_TINY_YAML))  # main.py: yaml.safe_load + dict2namespace
        config.device = torch.device("cpu")
        model = torch.nn.DataParallel(diffusion.Model(config))  # runners/diffusion.py train()
        train_state, ema_state = random_states(model.module, seed=6, count=2)
        model.load_state_dict({f"module.{k}": v for k, v in train_state.items()})
        optimizer = get_optimizer(config, model.parameters())
        ema_helper = ema.EMAHelper(mu=config.model.ema_rate)
        ema_helper.register(model)
        assert set(ema_helper.shadow) == set(ema_state)
        ema_helper.shadow = dict(ema_state)  # the EMA weights (compact views of the same keys)
        states = [
            {f"module.{k}": v for k, v in train_state.items()},  # = model.state_dict(), but compact
            optimizer.state_dict(), 0, 1, ema_helper.state_dict(),
        ]
        assert list(states[0]) == list(model.state_dict())
        save(states, out / "ddim_tiny_ckpt.pth")  # torch.save(states, ckpt.pth)

        # runners/diffusion.py sample(): Model, DataParallel, load states[0], EMAHelper on states[-1], ema(model)
        states = torch.load(out / "ddim_tiny_ckpt.pth", map_location=config.device)
        model = torch.nn.DataParallel(diffusion.Model(config))
        model.load_state_dict(states[0], strict=True)
        ema_helper = ema.EMAHelper(mu=config.model.ema_rate)
        ema_helper.register(model)
        ema_helper.load_state_dict(states[-1])
        ema_helper.ema(model)
        model.eval()
        x = inputs(8, (2, 3, 16, 16))
        steps = [0, 499, 999]  # functions/denoising.py: t = torch.ones(n) * i, i in 0..N-1 (compute_alpha: index i+1)
        with torch.no_grad():
            ddim_out = torch.stack([model(x, torch.ones(x.shape[0]) * i) for i in steps])
        schedules = {
            f"{s}_1000": torch.from_numpy(get_beta_schedule(s, beta_start=0.0001, beta_end=0.02,
                                                            num_diffusion_timesteps=1000))
            for s in ("linear",)
        } | {
            f"{s}_200": torch.from_numpy(get_beta_schedule(s, beta_start=0.0001, beta_end=0.02,
                                                           num_diffusion_timesteps=200))
            for s in ("quad", "const", "sigmoid", "jsd")
        }  # fmt: skip
        celeba = dict2namespace(yaml.safe_load((repo / "configs" / "celeba.yml").read_text()))
        with torch.device("meta"):
            full = diffusion.Model(celeba)
        manifests["ddim_celeba64"] = dict(
            kind="ddpm", options=DDPM_PUBLIC["ddim_celeba64"], keys=key_shapes(full),
            num_params=sum(p.numel() for p in full.parameters()),
            made_with=f"ermongroup/ddim@{revision} models/diffusion.py Model(configs/celeba.yml)",
        )  # fmt: skip
    return dict(x=x, t=torch.tensor(steps) + 1, t_theirs=torch.tensor(steps), out=ddim_out, betas=schedules,
                made_with=f"ermongroup/ddim@{revision}")


def make_pesser(repo: Path, out: Path, revision: str, manifests: dict) -> dict:
    print("pytorch_diffusion")
    with on_path(repo):
        pd_model = importlib.import_module("pytorch_diffusion.model")
        model = pd_model.Model(**PESSER_TINY)
        save(random_state(model, seed=9), out / "pesser_tiny.ckpt")  # a plain state dict, as its converted .ckpt
        model.load_state_dict(torch.load(out / "pesser_tiny.ckpt"))  # Diffusion.from_pretrained
        model.eval()
        x = inputs(10, (2, 1, 16, 16))
        steps = [0, 999]  # Diffusion.denoise: t = torch.ones(n) * i, i in 0..N-1
        with torch.no_grad():
            pesser_out = torch.stack([model(x, torch.ones(x.shape[0]) * i) for i in steps])
        cfgs = {"pesser_lsun_bedroom": "lsun_cfg", "pesser_cifar10": "cifar10_cfg"}
        for name in cfgs:
            opts = DDPM_PUBLIC[name]
            args = {k: opts[k] for k in ("resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
                                         "attn_resolutions", "dropout")}
            with torch.device("meta"):
                full = pd_model.Model(**{**args, "ch_mult": tuple(args["ch_mult"]),
                                         "attn_resolutions": tuple(args["attn_resolutions"])})
            manifests[name] = dict(
                kind="ddpm", options=opts, keys=key_shapes(full), num_params=sum(p.numel() for p in full.parameters()),
                made_with=f"pesser/pytorch_diffusion@{revision} Model(**Diffusion.from_pretrained {cfgs[name]})",
            )  # fmt: skip
    return dict(options=PESSER_TINY, x=x, t=torch.tensor(steps) + 1, out=pesser_out,
                made_with=f"pesser/pytorch_diffusion@{revision}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--improved-diffusion", type=Path, required=True)
    parser.add_argument("--ddim", type=Path, required=True)
    parser.add_argument("--pytorch-diffusion", type=Path, required=True)
    parser.add_argument("--analytic-dpm", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--revision", action="append", default=[], help="NAME=COMMIT, recorded in the fixtures")
    args = parser.parse_args()
    rev = dict(r.split("=", 1) for r in args.revision)
    torch.manual_seed(0)

    iddpm_dir, adpm_dir = args.out / "improved_diffusion", args.out / "analytic_dpm_official"
    ddpm_dir = args.out / "ddpm"
    for d in (iddpm_dir, adpm_dir, ddpm_dir):
        d.mkdir(parents=True, exist_ok=True)
    iddpm_manifests = make_iddpm(args.improved_diffusion, iddpm_dir, rev.get("improved-diffusion", "unknown"))
    make_adpm(args.analytic_dpm, adpm_dir, rev.get("analytic-dpm", "unknown"), iddpm_manifests)
    ddpm_manifests: dict = {}
    ddim = make_ddim(args.ddim, ddpm_dir, rev.get("ddim", "unknown"), ddpm_manifests)
    pesser = make_pesser(args.pytorch_diffusion, ddpm_dir, rev.get("pytorch-diffusion", "unknown"), ddpm_manifests)
    save(dict(ddim=ddim, pesser=pesser), ddpm_dir / "reference.pt")
    for d, m in ((iddpm_dir, iddpm_manifests), (ddpm_dir, ddpm_manifests)):
        path = d / "manifests.json.gz"
        with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as fh:
            fh.write((json.dumps(m, indent=0) + "\n").encode())
        print(f"  wrote {show(path)} ({path.stat().st_size / 1024:.1f} kB)")
    command = "python tools/make_pretrained_fixtures.py --improved-diffusion PATH --ddim PATH --pytorch-diffusion " \
              "PATH --analytic-dpm PATH"
    notes = {
        iddpm_dir: f"openai/improved-diffusion@{rev.get('improved-diffusion', 'unknown')} (and the Analytic-DPM "
                   "manifest entry: baofff/Analytic-DPM)",
        adpm_dir: f"baofff/Analytic-DPM@{rev.get('analytic-dpm', 'unknown')}",
        ddpm_dir: f"ermongroup/ddim@{rev.get('ddim', 'unknown')} and "
                  f"pesser/pytorch_diffusion@{rev.get('pytorch-diffusion', 'unknown')}",
    }
    for d, made_with in notes.items():
        readme(d / "README.md", f"""\
            Test fixtures made with {made_with}, by running that code outside this repository:

                {command}

            Tiny random-weight networks in the format's own on-disk layout, that project's outputs on fixed inputs
            and its betas (`reference.pt`); see the docstring of `tools/make_pretrained_fixtures.py`. Weight
            tensors are overlapping strided views of a few short random storages, so the files stay small.
            Nothing here is code: every file loads with `torch.load(weights_only=True)` or is YAML / gzipped JSON.
            """)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"fixtures under {args.out}: {total / 1024:.0f} kB")


if __name__ == "__main__":
    main()
