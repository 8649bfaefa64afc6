"""Make the covariance-head (SN-DPM / NPR-DPM) test fixtures by running baofff/Extended-Analytic-DPM's own code.

    python tools/make_head_fixtures.py --extended-analytic-dpm /tmp/ext/baofff+Extended-Analytic-DPM \\
        --revision 92aa7688a222e9845f903c0f4b98a6609b43d2c7

PATH is an extracted copy of that public repository (nothing of it is copied into this one). Output:
``tests/fixtures/pretrained/extended_analytic_dpm/``.

Networks: four TINY random-weight networks built with THEIR classes from THEIR dataset configs
(``configs/{cifar10,imagenet64,celeba64,lsun}/models.py`` ``get_*_double_pretrained_config``, shrunk: fewer
channels and blocks, small images), one per network family x head mode of their released models:

- ``iddpm_simple.pt``: ``UNetModel4Pretrained`` as for CIFAR-10 (mode simple; timestep ``n * 1000 / N``, no shift,
  linear schedule, N = 1000);
- ``iddpm_complex_learn_sigma.pt``: ``UNetModel4Pretrained`` as for ImageNet 64 (mode complex; 6 output channels of
  which eps is the first 3; ``shift1``: ``(n - 1) * 1000 / N``, cosine schedule, N = 4000), at 32x32;
- ``ddpm_simple.pt``: ``Model4Pretrained`` as for CelebA 64 (mode simple; ``shift1``; linear, N = 1000), at 16x16;
- ``ddpm_complex.pt``: ``Model4Pretrained`` as for LSUN bedroom (mode complex; ``shift1``; linear, N = 1000), 16x16.

EVERY parameter gets a random non-zero value (their zero-initialised convs included, so the head is live; the head
conv's bias is shifted by +2, see ``HEAD_BIAS``); the file
is the plain state dict they release (``torch.save(model.state_dict())``), read back along their loading path
(``interface/utils/config_utils.py`` ``create_models``: ``load_state_dict(torch.load(path), strict=False)``, then
``models.eval()``). The method flag does not change the network: SN and NPR load the same file.

Recorded in ``reference.pt`` (all plain tensors / dicts):

- ``networks[name]``: their ``DTWrapper`` (``core/diffusion/wrapper.py``, ``typ`` eps_eps2 and eps_epsc give the same
  tensors: it only splits the 2C output channels in two) on fixed ``x`` and ``n``, as ``eps`` and ``head``; ``n``
  is their index 1..N, the same as our t (the wrapper applies ``shift1`` / ``rescale_timesteps`` itself).
- ``moments[name]``: their ``DDPM`` / ``DDIM(eta=0)`` (``core/diffusion/dtdpm.py``) ``predict_xprev_cov_xprev(x_t,
  s, t, 'optimal')`` on fixed ``x_t`` for a few pairs (s, t). Their (s, t) index the schedule 0..N (0 = data)
  exactly as ours do, so no conversion is needed. ``mean[forward][variant]`` (SN and NPR give the same mean; the
  script checks it), ``var[sn|npr][forward][variant]``. Variants: ``clip`` (their evaluation setting: ``clip_x0``
  and the cov clip to [0, 1]), ``avg_cov`` (the same with ``avg_cov=True``: one Chat per image),
  ``no_clip_x0`` (``clip_x0=False, clip_cov_x0=True``; the mean only: the variance equals ``clip``'s). Stored: the
  whole ``x_t``, a crop (``crop`` = [h0, h1, w0, w1]) of the per-pixel means and variances (every pixel goes through
  the same elementwise formulas; the avg_cov variances, one per image, are stored whole), and for the 16x16 family
  the network's outputs at each (x_t, t) (``net``: eps, head), a reference for the formulas alone.
- ``networks[name]["eps" | "head"]`` of the 32x32 networks are the top-left 16x16 quadrant (``crop``) of the output,
  to keep the file small; the whole output of the 16x16 ones.
- ``betas``: their ``NamedSchedule`` betas (index 0 = 0) for the schedules used.

``manifests.json.gz``: the key -> shape lists of their full-size released SN/NPR networks (built on the meta device
with their classes and configs), with the options that load them here.

Weight tensors are overlapping ``as_strided`` views of a few short random storages (see
``tools/make_pretrained_fixtures.py``), so the files stay small.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "pretrained" / "extended_analytic_dpm"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_pretrained_fixtures import (  # noqa: E402 - the helpers of the other fixture maker
    function_from,
    inputs,
    key_shapes,
    module_from,
    on_path,
    random_state,
    readme,
    save,
    show,
)


class ConfigDict(dict):
    """Stand-in for ``ml_collections.ConfigDict`` (attribute access to a dict), enough for their config files."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setattr__(self, name, value):
        self[name] = value


def install_ml_collections_shim() -> None:
    if "ml_collections" not in sys.modules:
        sys.modules["ml_collections"] = types.SimpleNamespace(ConfigDict=ConfigDict)


# ---------------------------------------------------------------------------------------------------------
# The four tiny networks: (their config file, its function, hparams, shrinking overrides, wrapper, our options)
# ---------------------------------------------------------------------------------------------------------
NETWORKS = {
    "iddpm_simple": dict(
        config="cifar10", hparams=dict(mode="simple", model_channels=32, num_res_blocks=1),
        overrides={}, size=32, schedule=("linear", 1000), shift1=False,
        kind="improved_diffusion",
        options=dict(image_size=32, num_channels=32, num_res_blocks=1, dropout=0.3, diffusion_steps=1000,
                     noise_schedule="linear", timestep_shift=False),
    ),
    "iddpm_complex_learn_sigma": dict(
        config="imagenet64", hparams=dict(mode="complex", model_channels=32, num_res_blocks=1,
                                          channel_mult=(1, 2, 2, 2)),
        overrides={}, size=32, schedule=("cosine", 4000), shift1=True,
        kind="improved_diffusion",  # attention at downsampling 4, 8 of a 32x32 image: feature maps 8 and 4
        options=dict(image_size=32, num_channels=32, num_res_blocks=1, learn_sigma=True, attention_resolutions="8,4",
                     diffusion_steps=4000, noise_schedule="cosine"),
    ),
    "ddpm_simple": dict(
        config="celeba64", hparams=dict(mode="simple", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                        attn_resolutions=(8,)),
        overrides=dict(resolution=16), size=16, schedule=("linear", 1000), shift1=True,
        kind="ddpm",
        options=dict(resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1,
                     attn_resolutions=[8], dropout=0.1, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                     num_diffusion_timesteps=1000),
    ),
    "ddpm_complex": dict(
        config="lsun", hparams=dict(mode="complex", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                    attn_resolutions=(8,)),
        overrides=dict(resolution=16), size=16, schedule=("linear", 1000), shift1=True,
        kind="ddpm",
        options=dict(resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1,
                     attn_resolutions=[8], dropout=0.0, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                     num_diffusion_timesteps=1000),
    ),
}  # fmt: skip
CONFIG_FUNCTION = {"cifar10": "get_iddpm_unet_double_pretrained_config",
                   "imagenet64": "get_iddpm_unet_double_pretrained_config",
                   "celeba64": "get_ddpm_unet_double_pretrained_config",
                   "lsun": "get_ddpm_unet_double_pretrained_config"}
#: network -> (pairs (s, t), crop [h0, h1, w0, w1] of the stored per-pixel moments, whether to store the network's
#: outputs at each (x_t, t) too: a reference for the formulas alone)
MOMENTS = {
    "ddpm_simple": ([(0, 1), (10, 40), (250, 500), (600, 1000)], (0, 8, 0, 8), True),
    "iddpm_simple": ([(0, 3), (100, 700), (800, 1000)], (0, 8, 0, 8), False),
}
#: the stored part of the wrapper outputs of the 32x32 networks (the top-left quadrant: two borders and inside)
OUTPUT_CROP = {32: (0, 16, 0, 16), 16: None}


def cut(v: torch.Tensor, crop) -> torch.Tensor:
    """A compact copy of ``v`` or of its crop ``[..., h0:h1, w0:w1]`` (tensors of one pixel are kept whole)."""
    if crop is None or v.shape[-1] == 1:
        return v.clone()
    h0, h1, w0, w1 = crop
    return v[..., h0:h1, w0:w1].clone()

#: (DDPM Model?, mode) -> the key of the head's output conv bias. It is shifted by HEAD_BIAS_SHIFT so that the SN
#: head h (~ E[eps^2|x_t] >= 0 when trained) exceeds eps_hat^2 on average, as a trained one does: with a head of mean
#: 0, Chat = (bbar/abar)(h - eps_hat^2) would be negative on average and every avg_cov variance clipped to 0.
HEAD_BIAS = {(False, "simple"): "out2.2.bias", (False, "complex"): "out2.3.bias",
             (True, "simple"): "conv_out2.bias", (True, "complex"): "conv_out2.bias"}
HEAD_BIAS_SHIFT = 2.0
METHODS = {"sn": ("pred_eps_eps2_pretrained", "eps_eps2"), "npr": ("pred_eps_epsc_pretrained", "eps_epsc")}
#: their released models (README "Models and FID statistics"): config, hparams -> the options that load them here
RELEASED = {
    "cifar10_ls": ("cifar10", {}, "improved_diffusion",
                   dict(image_size=32, num_channels=128, num_res_blocks=3, dropout=0.3, diffusion_steps=1000,
                        noise_schedule="linear", timestep_shift=False), {"sn": "simple", "npr": "simple"}),
    "cifar10_cs": ("cifar10", {}, "improved_diffusion",
                   dict(image_size=32, num_channels=128, num_res_blocks=3, dropout=0.3, diffusion_steps=1000,
                        noise_schedule="cosine", timestep_shift=False), {"sn": "simple", "npr": "simple"}),
    "imagenet64": ("imagenet64", {}, "improved_diffusion",
                   dict(image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True, diffusion_steps=4000,
                        noise_schedule="cosine"), {"sn": "complex", "npr": "simple"}),
    "celeba64": ("celeba64", {}, "ddpm",
                 dict(resolution=64, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 2, 2, 4], num_res_blocks=2,
                      attn_resolutions=[16], dropout=0.1, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                      num_diffusion_timesteps=1000), {"sn": "simple", "npr": "simple"}),
    "lsun_bedroom": ("lsun", {}, "ddpm",
                     dict(resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4, 4],
                          num_res_blocks=2, attn_resolutions=[16], dropout=0.0, beta_schedule="linear",
                          beta_start=0.0001, beta_end=0.02, num_diffusion_timesteps=1000),
                     {"sn": "complex", "npr": "simple"}),
}  # fmt: skip


class Theirs:
    """Their modules, imported from the extracted repository (their package ``__init__``s pull in datasets,
    tensorboard and ml_collections; each needed file is loaded on its own instead)."""

    def __init__(self, repo: Path):
        install_ml_collections_shim()
        self.repo = repo
        self.dtdpm = __import__("core.diffusion.dtdpm", fromlist=["DDPM"])
        self.wrapper = __import__("core.diffusion.wrapper", fromlist=["DTWrapper"])
        self.schedule = __import__("core.diffusion.schedule", fromlist=["NamedSchedule"])
        self.configs = {name: module_from(repo / "configs" / name / "models.py", f"ead_configs_{name}")
                        for name in CONFIG_FUNCTION}
        managers = __import__("core.utils.managers", fromlist=["ModelsManager"])
        ns = {"torch": torch, "logging": __import__("logging"), "managers": managers}
        path = repo / "interface" / "utils" / "config_utils.py"
        for fn in ("create_instance", "create_models", "create_wrapper"):
            function_from(path, fn, ns)
        self.create_models, self.create_wrapper = ns["create_models"], ns["create_wrapper"]
        dns = {"ml_collections": sys.modules["ml_collections"], "wrapper": self.wrapper}
        self.get_dt_wrapper_config = function_from(repo / "configs" / "default.py", "get_dt_wrapper_config", dns)

    def model_config(self, config: str, pretrained_path, overrides=None, **hparams):
        cfg = getattr(self.configs[config], CONFIG_FUNCTION[config])(pretrained_path=pretrained_path, **hparams)
        cfg.kwargs.update(overrides or {})
        return cfg

    def load(self, spec: dict, path: Path, typ: str):
        """Their evaluation path: create_models (load_state_dict strict=False), create_wrapper, models.eval()."""
        models_cfg = ConfigDict(model=self.model_config(spec["config"], str(path), spec["overrides"],
                                                        **spec["hparams"]))
        models = self.create_models(models_cfg)
        missing, unexpected = models.get("model").load_state_dict(torch.load(path), strict=False)
        assert not missing and not unexpected, (missing, unexpected)  # their strict=False must not hide anything
        name, n = spec["schedule"]
        wcfg = self.get_dt_wrapper_config(typ=typ, N=n, shift1=spec["shift1"])
        wrapper = self.create_wrapper(wcfg, models)
        models.eval()
        return models, wrapper

    def named_schedule(self, name: str, n: int):
        return self.schedule.NamedSchedule(name, n)


def make_networks(theirs: Theirs, out: Path) -> tuple[dict, dict]:
    refs, loaded = {}, {}
    xs = {32: inputs(21, (2, 3, 32, 32)), 16: inputs(22, (2, 3, 16, 16))}
    for index, (name, spec) in enumerate(NETWORKS.items()):
        print(name)
        cfg = theirs.model_config(spec["config"], "unused", spec["overrides"], **spec["hparams"])
        model = cfg.cls(**cfg.kwargs)
        state = random_state(model, seed=30 + index)
        bias = HEAD_BIAS[spec["config"] in ("celeba64", "lsun"), spec["hparams"]["mode"]]
        state[bias] = state[bias] + HEAD_BIAS_SHIFT
        assert all((v != 0).all() for v in state.values()), "every parameter non-zero"
        save(state, out / f"{name}.pt")  # as they release them: a plain state dict
        n_total = spec["schedule"][1]
        n = torch.tensor([1, n_total])
        x = xs[spec["size"]]
        outs = {}
        for kind, (_, typ) in METHODS.items():
            models, wrapper = theirs.load(spec, out / f"{name}.pt", typ)
            with torch.no_grad():
                eps, head = wrapper(x, n.numpy())
            outs[kind] = (eps.clone(), head.clone())
            loaded[(name, kind)] = (models, wrapper)
        assert all(torch.equal(a, b) for a, b in zip(outs["sn"], outs["npr"], strict=True))
        eps, head = outs["sn"]
        assert eps.shape == head.shape == x.shape and head.abs().min() > 0
        crop = OUTPUT_CROP[spec["size"]]
        refs[name] = dict(file=f"{name}.pt", kind=spec["kind"], options=spec["options"], mode=spec["hparams"]["mode"],
                          x=x, n=n, eps=cut(eps, crop), head=cut(head, crop), crop=None if crop is None else list(crop),
                          schedule=list(spec["schedule"]), shift1=spec["shift1"])  # fmt: skip
    return refs, loaded


def their_step(theirs: Theirs, wrapper, schedule, forward: str, variant: str, x_t, s: int, t: int):
    """Their ``predict_xprev_cov_xprev(x_t, s, t, 'optimal')`` of DDPM or DDIM(eta=0) in one of the variants."""
    kw = dict(clip_x0=variant != "no_clip_x0", clip_cov_x0=True, avg_cov=variant == "avg_cov")
    if forward == "ddpm":
        dpm = theirs.dtdpm.DDPM(wrapper, schedule, **kw)
    else:
        dpm = theirs.dtdpm.DDIM(wrapper, schedule, eta=0.0, **kw)
    with torch.no_grad():
        m, v = dpm.predict_xprev_cov_xprev(x_t, s, t, "optimal")
    assert m.dtype == v.dtype == torch.float32 and m.shape == x_t.shape
    assert v.shape == ((x_t.shape[0], 1, 1, 1) if variant == "avg_cov" else x_t.shape)
    return m, v


def make_moments(theirs: Theirs, loaded: dict) -> dict:
    refs = {}
    regimes = {"x0_clamped": 0, "chat_below_0": 0, "chat_above_1": 0}
    for name, (pairs, crop, store_net) in MOMENTS.items():
        print(f"moments {name}")
        spec = NETWORKS[name]
        schedule = theirs.named_schedule(*spec["schedule"])
        size = spec["size"]
        gen = torch.Generator().manual_seed(40 + len(refs))
        x0 = torch.rand((1, 3, size, size), generator=gen) * 2 - 1
        x_ts = []
        for _, t in pairs:
            noise = torch.randn((1, 3, size, size), generator=gen)
            x_ts.append((schedule.cum_alphas[t] ** 0.5 * x0.double() + schedule.cum_betas[t] ** 0.5 * noise.double())
                        .float())

        mean = {f: {"clip": [], "no_clip_x0": []} for f in ("ddpm", "ddim")}
        var = {k: {f: {"clip": [], "avg_cov": []} for f in ("ddpm", "ddim")} for k in METHODS}
        net = {"eps": [], "head": []}
        for (s, t), x_t in zip(pairs, x_ts, strict=True):
            for kind in METHODS:
                _, wrapper = loaded[(name, kind)]
                for forward in ("ddpm", "ddim"):
                    for variant in ("clip", "avg_cov", "no_clip_x0"):
                        m, v = their_step(theirs, wrapper, schedule, forward, variant, x_t, s, t)
                        m, v = cut(m, crop), cut(v, crop)
                        if kind == "sn" and variant != "avg_cov":
                            mean[forward][variant].append(m)
                        else:  # the mean does not depend on the head (nor on avg_cov)
                            assert torch.equal(m, mean[forward]["clip" if variant == "avg_cov" else variant][-1])
                        if variant == "no_clip_x0":  # the cov clip is unchanged: the same variance as "clip"
                            assert torch.equal(v, var[kind][forward]["clip"][-1])
                        else:
                            var[kind][forward][variant].append(v)
            with torch.no_grad():
                eps, head = loaded[(name, "sn")][1](x_t, t)
            if store_net:
                net["eps"].append(eps.clone())
                net["head"].append(head.clone())
            # which regimes of the clips this fixture exercises (printed; all must occur somewhere)
            abar, bbar = schedule.cum_alphas[t], schedule.cum_betas[t]
            x0hat = abar ** -0.5 * x_t - (bbar / abar) ** 0.5 * eps
            chat_sn = (bbar / abar) * (head - eps.pow(2))
            chat_npr = (bbar / abar) * head
            counts = {"x0_clamped": int((x0hat.abs() > 1).sum()),
                      "chat_below_0": int((chat_sn < 0).sum() + (chat_npr < 0).sum()),
                      "chat_above_1": int((chat_sn > 1).sum() + (chat_npr > 1).sum())}
            for k, c in counts.items():
                regimes[k] += c
            print(f"  (s, t) = ({s}, {t}): {counts} of {x_t.numel()} pixels (x2 heads for Chat)")
        refs[name] = dict(
            network=name, pairs=torch.tensor(pairs), x_t=torch.stack(x_ts), crop=None if crop is None else list(crop),
            mean={f: {v: torch.stack(ts) for v, ts in d.items()} for f, d in mean.items()},
            var={k: {f: {v: torch.stack(ts) for v, ts in d.items()} for f, d in dk.items()} for k, dk in var.items()},
            net={k: torch.stack(v) for k, v in net.items()} if store_net else None,
        )  # fmt: skip
    assert all(c > 0 for c in regimes.values()), regimes
    for name, ref in refs.items():  # the avg_cov variances are not all at a clip bound: Chat's mean is tested
        for kind in METHODS:
            for forward in ("ddpm", "ddim"):
                v = ref["var"][kind][forward]["avg_cov"]
                assert (v > 0).any(), (name, kind, forward)
    return refs


def make_manifests(theirs: Theirs, revision: str) -> dict:
    manifests = {}
    for name, (config, hparams, kind, options, modes) in RELEASED.items():
        for head_kind, mode in modes.items():
            cfg = theirs.model_config(config, "released.pth", mode=mode, **hparams)
            with torch.device("meta"):
                m = cfg.cls(**cfg.kwargs)
            manifests[f"{name}_{head_kind}"] = dict(
                kind=kind, options={**options, "method": METHODS[head_kind][0], "mode": mode}, keys=key_shapes(m),
                num_params=sum(p.numel() for p in m.parameters()),
                made_with=f"baofff/Extended-Analytic-DPM@{revision} configs/{config}/models.py "
                          f"{CONFIG_FUNCTION[config]}(mode={mode!r})",
            )  # fmt: skip
    return manifests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extended-analytic-dpm", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--revision", default="unknown", help="the commit of that repository, recorded")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with on_path(args.extended_analytic_dpm):
        theirs = Theirs(args.extended_analytic_dpm)
        networks, loaded = make_networks(theirs, out)
        moments = make_moments(theirs, loaded)
        betas = {f"{name}_{n}": torch.from_numpy(np.asarray(theirs.named_schedule(name, n).betas))
                 for name, n in {tuple(NETWORKS[m]["schedule"]) for m in MOMENTS}}  # those of the moments
        manifests = make_manifests(theirs, args.revision)
    made_with = f"baofff/Extended-Analytic-DPM@{args.revision}"
    save(dict(networks=networks, moments=moments, betas=betas, made_with=made_with), out / "reference.pt")
    path = out / "manifests.json.gz"
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as fh:
        fh.write((json.dumps(manifests, indent=0) + "\n").encode())
    print(f"  wrote {show(path)} ({path.stat().st_size / 1024:.1f} kB)")
    readme(out / "README.md", f"""\
        Test fixtures made with {made_with}, the code of "Estimating the Optimal Covariance with
        Imperfect Mean in Diffusion Probabilistic Models" (ICML 2022), by running it outside this repository:

            python tools/make_head_fixtures.py --extended-analytic-dpm PATH --revision {args.revision}

        - `iddpm_simple.pt`, `iddpm_complex_learn_sigma.pt`, `ddpm_simple.pt`, `ddpm_complex.pt`: tiny random-weight
          networks of their classes (`UNetModel4Pretrained`, `Model4Pretrained`) built from their CIFAR-10,
          ImageNet 64, CelebA 64 and LSUN configs (shrunk), every parameter non-zero, saved as plain state dicts as
          they release their SN/NPR models.
        - `reference.pt`: their `DTWrapper` outputs (eps, head) on fixed inputs, their `DDPM` / `DDIM(eta=0)`
          `predict_xprev_cov_xprev(x_t, s, t, 'optimal')` mean and variance for SN and NPR on fixed x_t (their s, t
          index the schedule 0..N like ours: no conversion), and their betas.
        - `manifests.json.gz`: key -> shape lists of their full-size released SN/NPR networks, with the options
          that load them here.

        See the docstring of `tools/make_head_fixtures.py`. Weight tensors are overlapping strided views of a few
        short random storages, so the files stay small. Nothing here is code: every file loads with
        `torch.load(weights_only=True)` or is gzipped JSON.
        """)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"fixtures under {out}: {total / 1024:.0f} kB")


if __name__ == "__main__":
    main()
