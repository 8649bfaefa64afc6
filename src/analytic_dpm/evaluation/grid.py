"""The K x trajectory x method evaluation grid: plans cells, runs them as LightningModules, stores rows as it goes.

One NLL pass per (trajectory, K) serves every DDPM-type method (they share the network evaluations); FID is
per cell, with samples streamed into torchmetrics' FID. Both run under a Lightning ``Trainer``
(:mod:`.modules`: one device, DDP, several nodes); rank 0 writes the rows. Cells that are not defined (NLL of DDIM
methods, the optimal trajectory for DDIM, quadratic duplicates) are recorded with the reason in ``note``.
Rerunning into the same run directory skips finished cells (``ResultStore``); a shard job
(``eval.num_shards > 1``) writes partial statistics instead of values (:mod:`.shards`).
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..files import atomic_write_text
from ..identity import digest_json, short
from ..methods import METHODS, check_method
from ..schedule import NoiseSchedule
from ..trajectory import TRAJECTORY_KINDS, make_trajectory
from ..validation import NonFiniteOutputError
from ..variance import reverse_variance, variance_bounds
from .results import ResultStore, normalize_row
from .settings import EvalSettings
from .shards import read_shard_id, shard_path, write_nll_shard

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
    identity: dict = field(default_factory=dict)  # the run's identity (setup._run_identity): model, Gamma, seed...
    # the network's precision while sampling for FID, as recorded (eval.fid.precision, else the run's precision)
    fid_precision: str | None = None


@dataclass
class FidContext:
    metric: Any  # analytic_dpm.fid.InceptionFID with the reference (real) statistics loaded
    reference_path: str | None = None  # where the reference statistics are on disk (shard merges read them)
    identity: dict = field(default_factory=dict)  # Inception weights and reference statistics


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
    """Computes the requested cells of a grid into a :class:`ResultStore`, skipping what is already there.

    A metric of a cell is reused only when the stored row's id (``nll_id`` / ``fid_id``) equals the id this run
    produces (:meth:`nll_id`, :meth:`fid_id`); :meth:`conflicts` lists stored values computed by anything else, which
    the caller refuses or redirects before calling :meth:`run`. A cell whose network output is not finite is
    recorded as failed (value None, the reason in ``note``) and listed in :attr:`failures`.
    """

    def __init__(self, ctx: EvalContext, store: ResultStore, settings: EvalSettings,
                 on_row: Callable[[dict], None] | None = None, trainer=None):
        self.ctx, self.store, self.s = ctx, store, settings
        self.on_row = on_row or (lambda row: None)
        self.seed = settings.seed
        self.metrics = list(settings.metrics)
        self.failures: list[str] = []
        self.trainer = trainer
        self.shard, self.num_shards = settings.shard, settings.num_shards
        if "fid" in self.metrics and not ctx.is_image:
            log.warning("FID needs images: not defined for %s", ctx.dataset)
        self._nll_id: str | None = None
        self._nets: dict[tuple[str, int], Any] = {}

    def network(self, phase: str, batch: int):
        """The noise predictor at ``eval.precision`` (``phase="fid"``: ``eval.fid.precision`` when set) and
        ``eval.compile`` (:mod:`analytic_dpm.accel`), one wrapper per phase, each with the static batch of that phase
        (sampling batch, NLL network batch)."""
        key = (phase, int(batch))
        if key not in self._nets:
            from ..accel import prepare_eps_model

            precision = self.s.fid_precision if phase == "fid" else self.s.precision
            self._nets[key] = prepare_eps_model(self.ctx.eps_model, precision=precision,
                                                compile=self.s.compile, mode=self.s.compile_mode,
                                                device=self.ctx.device, static_batch=int(batch))
        return self._nets[key]

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes results (every rank computes)."""
        return self.trainer is None or self.trainer.is_global_zero

    # ------------------------------------------------------------------ identity
    def nll_identity(self) -> dict:
        n = self.ctx.num_heldout if self.s.nll.num_images is None else min(self.s.nll.num_images,
                                                                           self.ctx.num_heldout)
        return {**self.ctx.identity, "metric": "nll", "num_images": n, "batch_size": self.s.nll.batch_size,
                "network_batch": self.s.nll.network_batch, "nll_options": self.ctx.nll_options}

    def fid_identity(self, method: str) -> dict:
        f = self.s.fid
        ident = {**self.ctx.identity, "metric": "fid", "num_samples": f.num_samples, "batch_size": f.batch_size,
                 "clip_sigma_y": f.clip_sigma_y.get(method), "features": getattr(self.ctx.fid, "identity", None)}
        sampling = self.ctx.fid_precision
        if sampling and sampling != self.ctx.identity.get("precision"):  # absent when equal: older fid_ids stay
            ident["sample_precision"] = sampling
        return ident

    def nll_id(self) -> str:
        if self._nll_id is None:
            self._nll_id = short(digest_json(self.nll_identity()))
        return self._nll_id

    def fid_id(self, method: str) -> str:
        return short(digest_json(self.fid_identity(method)))

    def identities(self) -> dict[str, dict]:
        """id -> the full identity it hashes, for ``identities.json`` (what produced each number, readable)."""
        out = {self.nll_id(): self.nll_identity()} if "nll" in self.metrics else {}
        if "fid" in self.metrics and self.ctx.fid is not None:
            for m in self.s.method:
                out[self.fid_id(m)] = self.fid_identity(m)
        return out

    def conflicts(self) -> list[str]:
        """Stored values that this run would not have produced (another model, Gamma, seed, settings, version)."""
        i = self._base_row(Cell("ddpm_beta", "even", 1))
        run_cols = {c: i[c] for c in ("model_id", "gamma_hash", "seed", "precision", "gamma_policy", "version",
                                      "dataset", "N")}
        run_cols = {c: normalize_row({**i, c: v})[c] for c, v in run_cols.items()}  # as stored (e.g. "" for None)
        out: list[str] = []
        for row in self.store.rows:
            if row["nll_bpd"] is None and row["fid"] is None:
                continue
            where = f"{row['method']}/{row['trajectory']}/K={row['K']}"
            diffs = [f"{c} {row[c]!r} (now {v!r})" for c, v in run_cols.items() if row.get(c) != v]
            if diffs:
                out.append(f"{where}: {', '.join(diffs)}")
                continue
            if "nll" in self.metrics and row["nll_bpd"] is not None and row["nll_id"] != self.nll_id():
                out.append(f"{where}: NLL computed with other NLL settings (nll_id {row['nll_id'] or '-'}, now "
                           f"{self.nll_id()}; e.g. num_nll_images {row['num_nll_images']})")
            if ("fid" in self.metrics and self.ctx.fid is not None and row["fid"] is not None
                    and row["method"] in METHODS and row["fid_id"] != self.fid_id(row["method"])):
                out.append(f"{where}: FID computed with other FID settings (fid_id {row['fid_id'] or '-'}, now "
                           f"{self.fid_id(row['method'])}; e.g. num_fid_samples {row['num_fid_samples']})")
        return out

    # ------------------------------------------------------------------ helpers
    def _base_row(self, cell: Cell) -> dict:
        i = self.ctx.identity
        return dict(dataset=self.ctx.dataset, schedule=self.ctx.schedule.name, N=self.ctx.schedule.N,
                    forward=cell.forward, method=cell.method, trajectory=cell.trajectory, K=cell.K,
                    gamma_M=self.ctx.gamma_M, seed=self.seed, model_id=i.get("model_id"),
                    model_step=i.get("model_step"), gamma_hash=i.get("gamma_hash"), precision=i.get("precision"),
                    gamma_policy=self.s.gamma_policy, version=i.get("version"))

    def _key(self, cell: Cell) -> tuple:
        return (self.ctx.dataset, self.ctx.schedule.name, self.ctx.schedule.N, cell.method, cell.trajectory, cell.K)

    def _save(self, row: dict) -> None:
        """Merge ``row`` (one metric's result) into the store; that metric's old note is replaced by the new one."""
        if not self.is_writer:
            return
        prefix = "NLL:" if "nll_bpd" in row else "FID:"
        if "fid" in row and self.ctx.fid is not None:  # the precision the FID samples were drawn at
            row["fid_precision"] = self.ctx.fid_precision or row.get("precision")
        old = self.store.get(self._key(Cell(row["method"], row["trajectory"], row["K"])))
        kept = [n for n in ((old or {}).get("note") or "").split("; ") if n and not n.startswith(prefix)]
        row["note"] = "; ".join(kept + ([row["note"]] if row.get("note") else []))
        saved = self.store.add(row, merge=True)
        self.on_row(saved)

    def _cell_dir_name(self, c: Cell) -> str:
        return self.store.cell_dir(self._key(c), create=False).name

    def _shard_file(self, c: Cell, metric: str) -> Path:
        return shard_path(self.store.run_dir, self._cell_dir_name(c), metric, self.shard, self.num_shards)

    def trajectory(self, cell: Cell) -> list[int]:
        return make_trajectory(
            cell.trajectory, self.ctx.schedule.N, cell.K, self.ctx.gamma, schedule=self.ctx.schedule,
            forward=cell.forward, data_range=self.ctx.data_range,
            gamma_policy=self.s.gamma_policy, duplicates=self.s.quadratic_duplicates,
        )

    def _nll_done(self, c: Cell) -> bool:
        if self.num_shards > 1 and c.forward == "ddpm":
            return read_shard_id(self._shard_file(c, "nll")) == self.nll_id()
        return self.store.done(self._key(c), ("nll_bpd",), {"nll_bpd": self.nll_id()})

    def _fid_done(self, c: Cell) -> bool:
        if self.ctx.fid is None and self.ctx.is_image:  # not computable now: only a "not computed" note
            row = self.store.get(self._key(c)) or {}
            return "FID: not computed" in row.get("note", "")
        if self.num_shards > 1 and self.ctx.fid is not None:
            return read_shard_id(self._shard_file(c, "fid")) == self.fid_id(c.method)
        return self.store.done(self._key(c), ("fid",), {"fid": self.fid_id(c.method) if self.ctx.fid else ""})

    # ------------------------------------------------------------------ the grid
    def plan(self, cells: Sequence[Cell]) -> list[tuple[str, Cell | list[Cell]]]:
        """The work still to do, decided once (every rank of a DDP run must take the same decisions)."""
        self.store.refresh()
        groups: dict[tuple[str, int], list[Cell]] = {}
        for c in cells:
            groups.setdefault((c.trajectory, c.K), []).append(c)
        work: list[tuple[str, Cell | list[Cell]]] = []
        for group in groups.values():
            if "nll" in self.metrics:
                todo = [c for c in group if not self._nll_done(c)]
                if todo:
                    work.append(("nll", todo))
            if "fid" in self.metrics:
                work += [("fid", c) for c in group if self.s.fid.wanted(c.method, c.K) and not self._fid_done(c)]
        return work

    def run(self, cells: Sequence[Cell]) -> None:
        work = self.plan(cells)
        bar = tqdm(work, desc="grid", unit="job", disable=not self.is_writer)
        for kind, item in bar:
            first = item[0] if isinstance(item, list) else item
            bar.set_postfix_str(f"{kind.upper()} {first.trajectory} K={first.K}")
            if kind == "nll":
                self._nll_group(item)
            else:
                self._fid_cell(item)

    def _record(self, cell: Cell, metric: str, value, note: str, **extra) -> None:
        """A metric that is not a number: NaN = not defined; None = not computed or failed (note says which)."""
        row = self._base_row(cell)
        row[metric] = value
        row["note"] = note
        row.update(extra)
        if self.is_writer:
            log.info("%s %s K=%d: %s", cell.method, cell.trajectory, cell.K, note)
        self._save(row)

    def _undefined(self, cell: Cell, metric: str, reason: str) -> None:
        id_col = {"nll_bpd": "nll_id", "fid": "fid_id"}[metric]
        ident = self.nll_id() if metric == "nll_bpd" else (self.fid_id(cell.method) if self.ctx.fid else "")
        self._record(cell, metric, math.nan, f"{'NLL' if metric == 'nll_bpd' else 'FID'}: {reason}",
                     **{id_col: ident})

    def _failed(self, cells: Sequence[Cell], metric: str, err: Exception) -> None:
        name = "NLL" if metric == "nll_bpd" else "FID"
        for c in cells:
            where = f"{c.method} {c.trajectory} K={c.K}"
            self.failures.append(f"{name} {where}: {err}")
            if self.is_writer:
                log.error("%s %s failed: %s", name, where, err)
            self._record(c, metric, None, f"{name}: failed: {err}")

    def _test(self, module) -> None:
        trainer = self.trainer
        if trainer is None:  # one process, no Lightning (notebooks, tests of the store): the same module, by hand
            from .modules import build_eval_trainer

            trainer = self.trainer = build_eval_trainer({"enable_progress_bar": False},
                                                        accelerator=self.ctx.device.type.replace("cuda", "gpu"))
        trainer.test(module, verbose=False)

    def _timed_test(self, module, network) -> float:
        """Run ``module``'s test loop; its wall seconds without the ``torch.compile`` time spent in it (the first
        call at a batch size compiles, logged by :mod:`analytic_dpm.accel`), so ``seconds`` is steady-state work."""
        compiling = getattr(network, "compile_seconds", 0.0)
        t0 = time.perf_counter()
        self._test(module)
        seconds = time.perf_counter() - t0
        return max(0.0, seconds - (getattr(network, "compile_seconds", 0.0) - compiling))

    def _nll_group(self, cells: list[Cell]) -> None:
        """One pass of network evaluations for all DDPM-type methods of one (trajectory, K)."""
        from .modules import NllGroupModule, block_ranges

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
        x_all = self.ctx.heldout(self.s.nll.num_images)
        blocks = [(j, x_all[s0:s0 + n]) for j, s0, n in block_ranges(len(x_all), self.s.nll.batch_size)]
        module = NllGroupModule(self.network("nll", self.s.nll.network_batch), self.ctx.schedule, taus, methods,
                                self.ctx.gamma,
                                self.ctx.nll_options, self.s.nll.network_batch,
                                cell_seed(self.seed, "nll", ddpm[0].trajectory, ddpm[0].K), blocks,
                                shard=self.shard, num_shards=self.num_shards)
        seconds = self._timed_test(module, module.predictor())
        res = module.result
        if int(res["bad_t"]) <= self.ctx.schedule.N:
            self._failed(ddpm, "nll_bpd", NonFiniteOutputError("nll_bpd", int(res["bad_t"])))
            return
        n = int(res["count"])
        if self.num_shards > 1:
            if self.is_writer:
                key = dict(dataset=self.ctx.dataset, schedule=self.ctx.schedule.name, N=self.ctx.schedule.N,
                           trajectory=ddpm[0].trajectory, K=ddpm[0].K)
                write_nll_shard(self._shard_file(ddpm[0], "nll"), nll_id=self.nll_id(), key=key, methods=methods,
                                bpd_sums=res["bpd"].tolist(), term_sums=res["terms"].tolist(), count=n, taus=taus,
                                shard=self.shard, num_shards=self.num_shards)
            for c in ddpm:
                self._record(c, "nll_bpd", None, f"NLL: shard {self.shard} of {self.num_shards} written "
                             "(merge the jobs' directories for the value)", nll_id=self.nll_id())
            return
        for i, c in enumerate(ddpm):
            row = self._base_row(c)
            row.update(nll_bpd=float(res["bpd"][i]) / n, num_nll_images=n, seconds=seconds, nll_id=self.nll_id(),
                       note="")
            if self.is_writer:  # per-term breakdown (bits/dim, mean over images): [L_0, L_{tau_1|tau_2}, ..., L_prior]
                atomic_write_text(self.store.cell_dir(self._key(c)) / "nll_terms.json", json.dumps({
                    "trajectory": taus, "layout": "L_0, L_(tau_{k-1}|tau_k) for k=2..K, L_prior",
                    "terms_bpd": (res["terms"][i] / n).tolist(), "nll_bpd": row["nll_bpd"],
                    "nll_id": self.nll_id()}, indent=1))
            self._save(row)

    def _fid_cell(self, cell: Cell) -> None:
        from .modules import FidCellModule, block_ranges

        if self.ctx.fid is None:
            if not self.ctx.is_image:
                self._undefined(cell, "fid", "not defined for non-image data")
            else:
                self._record(cell, "fid", None, "FID: not computed: no Inception weights (run `make fid-weights` or "
                             "set eval.fid.weights_path); a rerun computes it")
            return
        try:
            taus = self.trajectory(cell)
        except ValueError as e:
            self._undefined(cell, "fid", f"trajectory not defined: {e}")
            return
        f = self.s.fid
        blocks = [(j, n) for j, _, n in block_ranges(f.num_samples, f.batch_size)]
        grid = None
        if f.save_grid and self.is_writer and self.shard == 0:
            grid = self.store.cell_dir(self._key(cell)) / "samples.png"
        module = FidCellModule(self.network("fid", f.batch_size), self.ctx.schedule, taus, cell.method, self.ctx.gamma,
                               self.ctx.fid.metric, self.ctx.sample_shape,
                               cell_seed(self.seed, "fid", cell.method, cell.trajectory, cell.K), blocks,
                               eta=self.s.eta, clip_x0=self.s.clip_x0, clip_sigma_y=f.clip_sigma_y.get(cell.method),
                               data_range=self.ctx.data_range, grid_path=grid, shard=self.shard,
                               num_shards=self.num_shards)
        seconds = self._timed_test(module, module.predictor())
        res = module.result
        if res.bad_t:
            self._failed([cell], "fid", NonFiniteOutputError("sample", res.bad_t))
            return
        if self.num_shards > 1:
            if self.is_writer:
                meta = {"fid_id": self.fid_id(cell.method), "shard": self.shard, "num_shards": self.num_shards,
                        "reference_path": self.ctx.fid.reference_path,
                        "cell": dict(zip(("dataset", "schedule", "N", "method", "trajectory", "K"), self._key(cell)))}
                res.sums.metadata.update(meta)
                res.sums.save(self._shard_file(cell, "fid"))
            self._record(cell, "fid", None, f"FID: shard {self.shard} of {self.num_shards} written (merge the jobs' "
                         "directories for the value)", fid_id=self.fid_id(cell.method))
            return
        row = self._base_row(cell)
        row.update(fid=res.fid, num_fid_samples=res.count, seconds=seconds, fid_id=self.fid_id(cell.method), note="")
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
