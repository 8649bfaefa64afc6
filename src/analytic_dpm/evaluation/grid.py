"""The K x trajectory x method evaluation grid: plans cells, computes NLL and FID, stores rows as it goes.

One NLL pass per (trajectory, K) serves every DDPM-type method (they share the network evaluations); FID is
per cell, with samples streamed to the Inception network. Cells that are not defined (NLL of DDIM methods,
the optimal trajectory for DDIM, quadratic duplicates) are recorded with the reason in ``note``.
Rerunning into the same run directory skips finished cells (``ResultStore``).
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..likelihood import nll_bpd
from ..methods import METHODS, check_method
from ..sampler import sample
from ..schedule import NoiseSchedule
from ..trajectory import TRAJECTORY_KINDS, make_trajectory
from ..variance import reverse_variance, variance_bounds
from .results import ResultStore

log = logging.getLogger(__name__)
NLL_UNDEFINED_DDIM = "not defined for the DDIM forward process (lambda = 0 makes the bound infinite)"


@dataclass
class EvalContext:
    """Everything a grid needs, independent of where it came from (checkpoint or oracle)."""

    eps_model: Callable[[Tensor, Tensor], Tensor]
    schedule: NoiseSchedule
    gamma: Tensor
    gamma_M: int | None
    dataset: str
    data_range: tuple[float, float] | None
    heldout: Callable[[int | None], Tensor]  # n -> held-out batch in model space
    num_heldout: int
    sample_shape: tuple[int, ...]  # (C, H, W)
    device: torch.device
    is_image: bool = True
    fid: Any = None  # FidContext or None
    nll_options: dict = field(default_factory=dict)


@dataclass
class FidContext:
    features: Any  # analytic_dpm.fid.InceptionFeatures
    reference: Any  # analytic_dpm.fid.FeatureStats of the training split


@dataclass(frozen=True)
class Cell:
    method: str
    trajectory: str
    K: int

    @property
    def forward(self) -> str:
        return METHODS[self.method]


def as_list(value) -> list:
    """Config values may be scalars (one Hydra multirun job) or lists."""
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    return list(value)


def plan_cells(methods, trajectories, Ks, N: int) -> list[Cell]:
    methods = [str(m) for m in as_list(methods)]
    for m in methods:
        check_method(m)
    trajectories = [str(t) for t in as_list(trajectories)]
    for t in trajectories:
        if t not in TRAJECTORY_KINDS:
            raise ValueError(f"unknown trajectory {t!r}; choose from {', '.join(TRAJECTORY_KINDS)}")
    Ks = sorted({int(k) for k in as_list(Ks)})
    bad = [k for k in Ks if not 1 <= k <= N]
    if bad:
        raise ValueError(f"eval.K values {bad} are outside 1..N = 1..{N}")
    if not methods or not trajectories or not Ks:
        raise ValueError("eval.method, eval.trajectory and eval.K must each name at least one value")
    return [Cell(m, t, k) for t in trajectories for k in Ks for m in methods]


def cell_seed(base: int, *parts) -> int:
    """A per-cell seed, so a cell is reproducible when run alone (multirun job, resume)."""
    return zlib.crc32("/".join(str(p) for p in (base, *parts)).encode()) & 0x7FFFFFFF


class GridRunner:
    def __init__(self, ctx: EvalContext, store: ResultStore, cfg: dict, on_row: Callable[[dict], None] | None = None):
        self.ctx, self.store, self.cfg = ctx, store, cfg
        self.on_row = on_row or (lambda row: None)
        self.seed = int(cfg.get("seed", 0))
        self.metrics = [str(m) for m in as_list(cfg.get("metrics", ["nll"]))]
        for m in self.metrics:
            if m not in ("nll", "fid"):
                raise ValueError(f"unknown metric {m!r}; choose from nll, fid")
        if "fid" in self.metrics and not ctx.is_image:
            log.warning("FID needs images: skipped for %s", ctx.dataset)
            self.metrics.remove("fid")

    # ------------------------------------------------------------------ helpers
    def _base_row(self, cell: Cell) -> dict:
        return dict(dataset=self.ctx.dataset, schedule=self.ctx.schedule.name, N=self.ctx.schedule.N,
                    forward=cell.forward, method=cell.method, trajectory=cell.trajectory, K=cell.K,
                    gamma_M=self.ctx.gamma_M, seed=self.seed)

    def _key(self, cell: Cell) -> tuple:
        return (self.ctx.dataset, self.ctx.schedule.name, self.ctx.schedule.N, cell.method, cell.trajectory, cell.K)

    def _save(self, row: dict) -> None:
        old = self.store.get(self._key(Cell(row["method"], row["trajectory"], row["K"])))
        notes = [n for n in ((old or {}).get("note"), row.get("note")) if n]
        row["note"] = "; ".join(dict.fromkeys(notes))  # keep the reasons of both metrics, once each
        saved = self.store.add(row, merge=True)
        self.on_row(saved)

    def trajectory(self, cell: Cell) -> list[int]:
        return make_trajectory(
            cell.trajectory, self.ctx.schedule.N, cell.K, self.ctx.gamma, schedule=self.ctx.schedule,
            forward=cell.forward, data_range=self.ctx.data_range,
            gamma_policy=self.cfg.get("gamma_policy", "monotone"),
            duplicates=self.cfg.get("quadratic_duplicates", "reject"),
        )

    # ------------------------------------------------------------------ the grid
    def run(self, cells: Sequence[Cell]) -> None:
        groups: dict[tuple[str, int], list[Cell]] = {}
        for c in cells:
            groups.setdefault((c.trajectory, c.K), []).append(c)
        bar = tqdm(groups.items(), desc="grid (trajectory, K)", unit="group")
        for (traj_kind, K), group in bar:
            bar.set_postfix_str(f"{traj_kind} K={K}")
            todo_nll = [c for c in group if "nll" in self.metrics and not self.store.done(self._key(c), ("nll_bpd",))]
            todo_fid = [c for c in group if "fid" in self.metrics and self._fid_wanted(c)
                        and not self.store.done(self._key(c), ("fid",))]
            if todo_nll:
                self._nll_group(todo_nll)
            for c in todo_fid:
                self._fid_cell(c)

    def _fid_wanted(self, cell: Cell) -> bool:
        """FID is costly: ``eval.fid.K`` / ``eval.fid.method`` (null = all) restrict it to a sub-grid."""
        fcfg = self.cfg.get("fid", {})
        Ks, methods = as_list(fcfg.get("K")), as_list(fcfg.get("method"))
        return (not Ks or cell.K in Ks) and (not methods or cell.method in methods)

    def _undefined(self, cell: Cell, metric: str, reason: str) -> None:
        row = self._base_row(cell)
        row[metric] = math.nan
        row["note"] = f"{'NLL' if metric == 'nll_bpd' else 'FID'}: {reason}"
        log.info("%s %s K=%d: %s", cell.method, cell.trajectory, cell.K, reason)
        self._save(row)

    def _nll_group(self, cells: list[Cell]) -> None:
        """One pass of network evaluations for all DDPM-type methods of one (trajectory, K)."""
        ddpm = []
        for c in cells:
            if c.forward == "ddim":
                self._undefined(c, "nll_bpd", NLL_UNDEFINED_DDIM)
            else:
                ddpm.append(c)
        if not ddpm:
            return
        try:
            taus = self.trajectory(ddpm[0])
        except ValueError as e:
            for c in ddpm:
                self._undefined(c, "nll_bpd", f"trajectory not defined: {e}")
            return
        methods = [c.method for c in ddpm]
        ncfg = self.cfg.get("nll", {})
        n_images = ncfg.get("num_images")
        x_all = self.ctx.heldout(None if n_images is None else int(n_images))
        batch = int(ncfg.get("batch_size", 100))
        gen = torch.Generator(device=self.ctx.device).manual_seed(cell_seed(self.seed, "nll", ddpm[0].trajectory,
                                                                            ddpm[0].K))
        t0 = time.perf_counter()
        sums = {m: 0.0 for m in methods}
        term_sums = {m: torch.zeros(len(taus) + 1, dtype=torch.float64) for m in methods}
        for start in tqdm(range(0, len(x_all), batch), desc=f"NLL {ddpm[0].trajectory} K={len(taus)}", leave=False):
            x0 = x_all[start:start + batch].to(self.ctx.device)
            bpd, terms = nll_bpd(
                self.ctx.eps_model, self.ctx.schedule, taus, x0, methods, gamma=self.ctx.gamma,
                generator=gen, batch_size=int(ncfg.get("network_batch", 1000)), return_terms=True,
                **self.ctx.nll_options,
            )
            for m in methods:
                sums[m] += bpd[m].sum().item()
                term_sums[m] += terms[m].sum(0)
        seconds = time.perf_counter() - t0
        n = len(x_all)
        for c in ddpm:
            row = self._base_row(c)
            row.update(nll_bpd=sums[c.method] / n, num_nll_images=n, seconds=seconds)
            # per-term breakdown (bits/dim, mean over images): [L_0, L_{tau_1|tau_2}, ..., L_prior]
            cell_dir = self.store.cell_dir(self._key(c))
            (cell_dir / "nll_terms.json").write_text(json.dumps({
                "trajectory": taus, "layout": "L_0, L_(tau_{k-1}|tau_k) for k=2..K, L_prior",
                "terms_bpd": (term_sums[c.method] / n).tolist(), "nll_bpd": row["nll_bpd"]}, indent=1))
            self._save(row)

    def _fid_cell(self, cell: Cell) -> None:
        if self.ctx.fid is None:
            reason = ("not defined for non-image data" if not self.ctx.is_image
                      else "not computed: no Inception weights (run `make fid-weights` or set eval.fid.weights_path)")
            self._undefined(cell, "fid", reason)
            return
        try:
            taus = self.trajectory(cell)
        except ValueError as e:
            self._undefined(cell, "fid", f"trajectory not defined: {e}")
            return
        from ..fid import fid_of_stream

        fcfg = self.cfg.get("fid", {})
        num = int(fcfg.get("num_samples", 50000))
        bs = int(fcfg.get("batch_size", 500))
        clip_y = (fcfg.get("clip_sigma_y") or {}).get(cell.method)
        gen = torch.Generator(device=self.ctx.device).manual_seed(cell_seed(self.seed, "fid", cell.method,
                                                                            cell.trajectory, cell.K))
        cell_dir = self.store.cell_dir(self._key(cell))
        first: list[Tensor] = []

        def batches() -> Iterator[Tensor]:
            done = 0
            while done < num:
                n = min(bs, num - done)
                x = sample(self.ctx.eps_model, self.ctx.schedule, taus, cell.method, (n, *self.ctx.sample_shape),
                           gamma=self.ctx.gamma, eta=float(self.cfg.get("eta", 0.0)),
                           clip_x0=bool(self.cfg.get("clip_x0", True)), clip_sigma_y=clip_y, generator=gen,
                           device=self.ctx.device, data_range=self.ctx.data_range)
                if not first:
                    first.append(x[:64].cpu())
                done += n
                yield x

        t0 = time.perf_counter()
        fid = fid_of_stream(batches(), self.ctx.fid.reference, self.ctx.fid.features, num,
                            desc=f"FID {cell.method} {cell.trajectory} K={cell.K}")
        seconds = time.perf_counter() - t0
        if first and fcfg.get("save_grid", True):
            save_image_grid(first[0], cell_dir / "samples.png")
        row = self._base_row(cell)
        row.update(fid=fid, num_fid_samples=num, seconds=seconds)
        self._save(row)


def save_image_grid(x: Tensor, path) -> None:
    """Samples in [-1, 1] as a PNG grid (quantised exactly as for FID)."""
    from torchvision.utils import save_image

    save_image((x.clamp(-1, 1) + 1) / 2, str(path), nrow=int(math.ceil(math.sqrt(len(x)))))


def variance_curves(schedule: NoiseSchedule, gamma: Tensor, Ks: Sequence[int], data_range) -> dict:
    """sigma^2 of every method against the Theorem 2 bounds on even trajectories, for the report's plot."""
    out = {}
    for K in Ks:
        taus = make_trajectory("even", schedule.N, K)
        lower, upper = variance_bounds(schedule, taus, "ddpm", data_range=data_range)
        entry = {"t": taus, "lower": lower.tolist(), "upper": upper.tolist()}
        for m in ("ddpm_beta", "ddpm_beta_tilde", "analytic_ddpm"):
            entry[m] = reverse_variance(schedule, taus, m, gamma, data_range=data_range).tolist()
        out[K] = entry
    return out
