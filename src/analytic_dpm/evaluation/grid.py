"""The K x trajectory x method evaluation grid: plans cells, runs them as LightningModules, stores rows as it goes.

One NLL pass per (trajectory, K) serves every DDPM-type method (they share the network evaluations); FID is
per cell, with samples streamed into torchmetrics' FID. Both run under a Lightning ``Trainer``
(:mod:`.modules`: one device, DDP, several nodes); rank 0 writes the rows. Cells that are not defined (NLL of DDIM
methods, the optimal trajectory for DDIM, quadratic duplicates) are recorded with the reason in ``note``.
Rerunning into the same run directory skips finished cells (``ResultStore``); a shard job
(``eval.num_shards > 1``) writes partial statistics instead of values (:mod:`.shards`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..files import atomic_write_text, file_lock
from ..methods import check_method, head_kind
from ..seeding import cell_seed
from ..trajectory import TRAJECTORY_KINDS, make_trajectory
from ..validation import NonFiniteOutputError
from .context import Cell, EvalContext
from .provenance import ID_COLUMNS, Provenance
from .results import ResultStore
from .settings import EvalSettings
from .shards import read_shard_id, shard_path, write_nll_shard

log = logging.getLogger(__name__)
NLL_UNDEFINED_DDIM = "not defined for the DDIM forward process (lambda = 0 makes the bound infinite)"


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


def item_label(item) -> str:
    """A job's name: the method of a FID cell, ``group`` for an NLL group (its methods share one pass)."""
    return "group" if isinstance(item, list) else item.method


@contextlib.contextmanager
def claim(run_dir: Path, name: str, wait: bool, trainer=None):
    """Hold the claim ``<run_dir>/.claims/<name>.lock`` (POSIX lock: a process that dies releases it) for the
    block, yielding True, or yield False at once when another process holds it and ``wait`` is off. Under DDP only
    rank 0 takes it and every rank follows its decision."""
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    rank0 = trainer is None or trainer.is_global_zero
    lock, held = None, True
    if rank0:
        lock = file_lock(Path(run_dir) / ".claims" / f"{name}.lock", timeout=None if wait else 0.0,
                         what=f"{name} in {run_dir}", quiet=not wait)
        try:
            lock.__enter__()
        except TimeoutError:
            lock, held = None, False
    if world > 1:
        held = bool(trainer.strategy.broadcast(held, src=0))
    try:
        yield held
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


class GridRunner:
    """Computes the requested cells of a grid into a :class:`ResultStore`, skipping what is already there.

    What a number depends on is :attr:`provenance`'s (:mod:`.provenance`): a metric of a cell is reused only when
    the stored row's id (``nll_id`` / ``fid_id``) equals the id this run produces, and :meth:`conflicts` lists stored
    values computed by anything else, which the caller refuses or redirects before calling :meth:`run`. A cell whose
    network output is not finite is recorded as failed (value None, the reason in ``note``) and listed in
    :attr:`failures`.
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
        self.provenance = Provenance(ctx, settings)
        self._pair_costs: dict[str, Any] = {}
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

    def conflicts(self) -> list[str]:
        """Stored values that this run would not have produced (:meth:`.provenance.Provenance.conflicts`)."""
        return self.provenance.conflicts(self.store.rows)

    # ------------------------------------------------------------------ helpers
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
        """The cell's timesteps; the optimal trajectory of a head method runs the DP on its pair-cost table
        (:mod:`.costs`, estimated once per head kind and cached), every other one on Gamma (spec sections 6, 11)."""
        pair_costs = None
        if cell.trajectory == "optimal" and head_kind(cell.method) is not None and cell.forward == "ddpm":
            pair_costs = self.pair_costs(cell.method)
        return make_trajectory(
            cell.trajectory, self.ctx.schedule.N, cell.K, self.ctx.gamma, schedule=self.ctx.schedule,
            forward=cell.forward, data_range=self.ctx.data_range,
            gamma_policy=self.s.gamma_policy, duplicates=self.s.quadratic_duplicates, pair_costs=pair_costs,
        )

    def pair_costs(self, method: str):
        """The pair-cost table of ``method``'s head (cached in memory, and on disk beside Gamma)."""
        kind = head_kind(method)
        if kind not in self._pair_costs:
            from .costs import cached_pair_costs

            self._pair_costs[kind] = cached_pair_costs(self.ctx, self.s, method,
                                                       self.network("costs", self.s.head.cost_batch_size))
        return self._pair_costs[kind]

    def _nll_done(self, c: Cell) -> bool:
        nll_id = self.provenance.nll_id(c.method, c.trajectory)
        if self.num_shards > 1 and c.forward == "ddpm":
            return read_shard_id(self._shard_file(c, "nll"), c.method) == nll_id
        return self.store.done(self._key(c), ("nll_bpd",), {"nll_bpd": nll_id})

    def _fid_done(self, c: Cell) -> bool:
        if self.ctx.fid is None and self.ctx.is_image:  # not computable now: only a "not computed" note
            row = self.store.get(self._key(c)) or {}
            return "FID: not computed" in row.get("note", "")
        if self.num_shards > 1 and self.ctx.fid is not None:
            return read_shard_id(self._shard_file(c, "fid")) == self.provenance.fid_id(c.method, c.trajectory)
        return self.store.done(self._key(c), ("fid",),
                               {"fid": self.provenance.metric_id("fid", c.method, c.trajectory)})

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
        """Compute what :meth:`plan` leaves to do. Each job (an NLL group, a FID cell) is claimed first (a lock file
        under ``.claims/``): a job another process is computing in the same directory is left for last, then waited
        for and computed only if that process did not finish it (it died), so two identical grids started at once
        share the work instead of doubling it."""
        work = self.plan(cells)
        if self.is_writer:
            self._announce(cells, work)
        deferred = []
        bar = tqdm(work, desc="grid", unit="job", disable=not self.is_writer)
        for kind, item in bar:
            first = item[0] if isinstance(item, list) else item
            bar.set_postfix_str(f"{kind.upper()} {first.trajectory} K={first.K}")
            if not self._claimed_run(kind, item, wait=False):
                deferred.append((kind, item))
        for kind, item in deferred:
            log.info("waiting for another process computing %s %s K=%d in %s", kind.upper(), item_label(item),
                     (item[0] if isinstance(item, list) else item).K, self.store.run_dir)
            self._claimed_run(kind, item, wait=True)

    def _claimed_run(self, kind: str, item, wait: bool) -> bool:
        """Claim the job, recheck what is still to do (another process may have done it), compute it; False when
        another process holds the claim and ``wait`` is off."""
        with claim(self.store.run_dir, self._claim_name(kind, item), wait, self.trainer) as claimed:
            if not claimed:
                return False
            self.store.refresh()
            if kind == "nll":
                todo = [c for c in item if not self._nll_done(c)]
                if todo:
                    self._nll_group(todo)
            elif not self._fid_done(item):
                self._fid_cell(item)
        return True

    def _claim_name(self, kind: str, item) -> str:
        first = item[0] if isinstance(item, list) else item
        name = f"{kind}-{item_label(item)}-{first.trajectory}-K{first.K}"
        return name if self.num_shards == 1 else f"{name}-shard{self.shard}of{self.num_shards}"

    def _announce(self, cells: Sequence[Cell], work: list) -> None:
        """What the grid will cost: jobs to run (the rest reused) and their network calls."""
        n_img = self.provenance.nll_identity()["num_images"]
        calls = sum(n_img * item[0].K if kind == "nll" else self.s.fid.num_samples * item.K for kind, item in work)
        nll = sum(1 for kind, _ in work if kind == "nll")
        log.info("grid: %d cells; to compute: %d NLL group(s) (one network pass per trajectory and K serves its "
                 "methods) and %d FID cell(s), about %s network calls; the rest is reused", len(cells), nll,
                 len(work) - nll, f"{calls:,}")

    def _record(self, cell: Cell, metric: str, value, note: str, **extra) -> None:
        """A metric that is not a number: NaN = not defined; None = not computed or failed (note says which)."""
        row = self.provenance.row(cell)
        row[metric] = value
        row["note"] = note
        row.update(extra)
        if self.is_writer:
            log.info("%s %s K=%d: %s", cell.method, cell.trajectory, cell.K, note)
        self._save(row)

    def _undefined(self, cell: Cell, metric: str, reason: str) -> None:
        id_col = ID_COLUMNS[metric]
        ident = self.provenance.metric_id(metric, cell.method, cell.trajectory)
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
        """One pass of network evaluations for all DDPM-type methods of one (trajectory, K) that share their
        timesteps (the optimal trajectory of a head method has its own, from its pair-cost table: a pass of its own)."""
        ddpm = []
        for c in cells:
            if c.forward == "ddim":
                self._undefined(c, "nll_bpd", NLL_UNDEFINED_DDIM)
            elif (reason := self._head_mismatch(c)) is not None:
                self._undefined(c, "nll_bpd", reason)
            else:
                ddpm.append(c)
        passes: dict[tuple, list[Cell]] = {}
        for c in ddpm:
            try:
                passes.setdefault(tuple(self.trajectory(c)), []).append(c)
            except ValueError as e:
                self._undefined(c, "nll_bpd", f"trajectory not defined: {e}")
        for taus, group in passes.items():
            self._nll_pass(group, list(taus))

    def _head_mismatch(self, cell: Cell) -> str | None:
        """Why a head method cannot run on this model (no head, or a head of the other kind), or None."""
        want = head_kind(cell.method)
        if want is None or self.ctx.head_kind == want:
            return None
        have = f"an {self.ctx.head_kind.upper()} head" if self.ctx.head_kind else "no covariance head"
        return f"not defined: {cell.method} needs an {want.upper()} head, the model has {have}"

    def _nll_pass(self, ddpm: list[Cell], taus: list[int]) -> None:
        from .modules import NllGroupModule, block_ranges

        methods = [c.method for c in ddpm]
        x_all = self.ctx.heldout(self.s.nll.num_images)
        blocks = [(j, x_all[s0:s0 + n]) for j, s0, n in block_ranges(len(x_all), self.s.nll.batch_size)]
        options = {**self.ctx.nll_options, **({"avg_cov": True} if self.s.head.avg_cov else {})}
        module = NllGroupModule(self.network("nll", self.s.nll.network_batch), self.ctx.schedule, taus, methods,
                                self.ctx.gamma, options, self.s.nll.network_batch,
                                cell_seed(self.seed, "nll", ddpm[0].trajectory, ddpm[0].K), blocks,
                                shard=self.shard, num_shards=self.num_shards)
        seconds = self._timed_test(module, module.predictor())
        res = module.result
        if int(res["bad_t"]) <= self.ctx.schedule.N:
            self._failed(ddpm, "nll_bpd", NonFiniteOutputError("nll_bpd", int(res["bad_t"])))
            return
        n = int(res["count"])
        ids = {c.method: self.provenance.nll_id(c.method, c.trajectory) for c in ddpm}  # a head method's has its part
        if self.num_shards > 1:
            if self.is_writer:
                key = dict(dataset=self.ctx.dataset, schedule=self.ctx.schedule.name, N=self.ctx.schedule.N,
                           trajectory=ddpm[0].trajectory, K=ddpm[0].K)
                write_nll_shard(self._shard_file(ddpm[0], "nll"), nll_id=ids[ddpm[0].method], key=key,
                                methods=methods, bpd_sums=res["bpd"].tolist(), term_sums=res["terms"].tolist(),
                                count=n, taus=taus, shard=self.shard, num_shards=self.num_shards, nll_ids=ids)
            for c in ddpm:
                self._record(c, "nll_bpd", None, f"NLL: shard {self.shard} of {self.num_shards} written "
                             "(merge the jobs' directories for the value)", nll_id=ids[c.method])
            return
        for i, c in enumerate(ddpm):
            nll_id = ids[c.method]
            row = self.provenance.row(c)
            row.update(nll_bpd=float(res["bpd"][i]) / n, num_nll_images=n, seconds=seconds, nll_id=nll_id, note="")
            if self.is_writer:  # per-term breakdown (bits/dim, mean over images): [L_0, L_{tau_1|tau_2}, ..., L_prior]
                atomic_write_text(self.store.cell_dir(self._key(c)) / "nll_terms.json", json.dumps({
                    "trajectory": taus, "layout": "L_0, L_(tau_{k-1}|tau_k) for k=2..K, L_prior",
                    "terms_bpd": (res["terms"][i] / n).tolist(), "nll_bpd": row["nll_bpd"],
                    "nll_id": nll_id}, indent=1))
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
        if (reason := self._head_mismatch(cell)) is not None:
            self._undefined(cell, "fid", reason)
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
                               num_shards=self.num_shards, avg_cov=self.s.head.avg_cov)
        seconds = self._timed_test(module, module.predictor())
        res = module.result
        if res.bad_t:
            self._failed([cell], "fid", NonFiniteOutputError("sample", res.bad_t))
            return
        fid_id = self.provenance.fid_id(cell.method, cell.trajectory)
        if self.num_shards > 1:
            if self.is_writer:
                meta = {"fid_id": fid_id, "shard": self.shard, "num_shards": self.num_shards,
                        "reference_path": self.ctx.fid.reference_path,
                        "cell": dict(zip(("dataset", "schedule", "N", "method", "trajectory", "K"), self._key(cell)))}
                res.sums.metadata.update(meta)
                res.sums.save(self._shard_file(cell, "fid"))
            self._record(cell, "fid", None, f"FID: shard {self.shard} of {self.num_shards} written (merge the jobs' "
                         "directories for the value)", fid_id=fid_id)
            return
        row = self.provenance.row(cell)
        row.update(fid=res.fid, num_fid_samples=res.count, seconds=seconds, fid_id=fid_id, note="")
        self._save(row)
