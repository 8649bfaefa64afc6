"""``evaluate(cfg)``: the run behind ``evaluate.py`` (Hydra config ``conf/evaluate.yaml``).

Rerunning into a directory that already holds results (``hydra.run.dir=DIR``):

* cells computed by the same model, Gamma, data and settings (the ``*_id`` columns of the rows) are reused;
* cells recorded as "not computed" (e.g. no Inception weights then) or "failed" are computed;
* values computed by anything else (another checkpoint, Gamma, seed, precision, number of images or samples,
  package version, ...) are never shown as current: by default the run stops before computing anything and says
  what differs (``eval.on_mismatch=refuse``); ``eval.on_mismatch=new_dir`` writes into ``DIR-<id>`` instead, a
  directory named after this run's identity (rerunning the same command resumes it).

Two processes may write one directory at once: the store is locked and merged on every write, and a cell that
another process finished meanwhile is not recomputed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import UserError, report_user_errors
from ..files import atomic_write_text, file_lock
from ..plots import variance_curves
from .grid import GridRunner, plan_cells
from .request import EvalRequest, WandbSettings
from .results import ResultStore, load_rows
from .sources import build_context

log = logging.getLogger(__name__)

__all__ = ["CellsFailed", "evaluate", "run_cli"]

IDENTITIES_JSON = "identities.json"
RUN_JSON = "run.json"


class CellsFailed(RuntimeError):
    """Some cells could not be computed (e.g. the network returned NaN); they are recorded with the reason."""


def sweep_group() -> str | None:
    """The W&B group of a Hydra multirun: the sweep directory's name (every job and shard of it in one group)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(str(hc.sweep.dir)).name
    except Exception:  # noqa: BLE001 - not running under Hydra
        pass
    return None


def _wandb_run(w: WandbSettings, out_dir: Path):
    if w.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(mode=w.mode, project=w.project, name=w.name, group=w.group or sweep_group(), dir=str(out_dir),
                      job_type="evaluate", tags=list(w.tags), config=dict(w.config or {}))


def grid_methods(settings, ctx) -> list[str]:
    """``eval.method``, plus the methods of the model's covariance head when it has one (``eval.head.methods:
    auto``: ``sn_ddpm``, ``sn_ddim`` for an SN head, ``npr_ddpm``, ``npr_ddim`` for an NPR head). Head methods asked
    for a model without a head are refused, saying what to do."""
    from ..methods import HEAD_METHODS, head_kind

    methods = list(settings.method)
    asked = [m for m in methods if head_kind(m) is not None]
    if asked and ctx.head_kind is None:
        raise UserError(f"eval.method has {', '.join(asked)}, which need a model with a covariance head (SN-DPM / "
                        "NPR-DPM); this model has none: drop them, or evaluate a head model (a head checkpoint of "
                        "train.py, pretrained.options.method=..., or an oracle with model.head=sn|npr)")
    if ctx.head_kind is not None and settings.head.methods == "auto":
        methods += [m for m in HEAD_METHODS if head_kind(m) == ctx.head_kind and m not in methods]
    return methods


def _write_identities(out_dir: Path, runner: GridRunner, methods=None) -> None:
    """Record the full identity behind every id used in this directory (merged with what is there)."""
    path = out_dir / IDENTITIES_JSON
    with file_lock(out_dir / ResultStore.LOCK_NAME):
        known = json.loads(path.read_text()) if path.is_file() else {}
        known.update(runner.provenance.identities(methods))
        atomic_write_text(path, json.dumps(known, indent=1, sort_keys=True, default=str) + "\n")


def _write_run_json(out_dir: Path, ctx) -> None:
    """``run.json``: where the evaluated network came from and which conventions were applied to it (a pretrained
    model's format, timestep convention, EMA or training weights, layout), so a number can be audited later."""
    from .. import __version__

    doc = {"source": ctx.conventions, "dataset": ctx.dataset, "schedule": ctx.schedule.name, "N": ctx.schedule.N,
           "model_id": ctx.identity.get("model_id"), "gamma_hash": ctx.identity.get("gamma_hash"),
           "gamma_M": ctx.gamma_M, "version": __version__}
    atomic_write_text(out_dir / RUN_JSON, json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")


def _resolve_out_dir(out_dir: Path, runner_for, on_mismatch: str) -> tuple[Path, GridRunner]:
    """The directory to write into, after checking what it holds (module docstring)."""
    store = ResultStore(out_dir)
    runner = runner_for(store)
    conflicts = runner.conflicts()
    if not conflicts:
        return out_dir, runner
    listing = "\n  - ".join(conflicts[:8]) + (f"\n  - ... and {len(conflicts) - 8} more" if len(conflicts) > 8 else "")
    if on_mismatch == "refuse":
        raise UserError(
            f"{out_dir} already holds results computed by another model or with other settings; they would not be "
            f"this run's numbers:\n  - {listing}\nTo keep both, rerun with hydra.run.dir=NEW_DIR, or with "
            f"eval.on_mismatch=new_dir (writes into {out_dir}-<id>); to replace them, delete {out_dir}/results.*"
        )
    new_dir = out_dir.with_name(f"{out_dir.name}-{runner.provenance.run_id()}")
    log.warning("%s holds results of another model/settings (%d differences); writing into %s", out_dir,
                len(conflicts), new_dir)
    store = ResultStore(new_dir)
    runner = runner_for(store)
    if runner.conflicts():  # pragma: no cover - the id names the identity
        raise UserError(f"{new_dir} also holds other results; choose hydra.run.dir=NEW_DIR")
    return new_dir, runner


def _head_variance_maps(ctx, settings) -> dict | None:
    """For a model with a covariance head: its per-pixel variance on 4 held-out images at 3 steps of K = 10 (the
    report's ``variance_maps.png``); None otherwise."""
    if ctx.head_kind is None or ctx.schedule.N < 10:
        return None
    from ..plots import variance_maps

    x0 = ctx.heldout(4).to(ctx.device)
    clip = bool(ctx.nll_options.get("clip_x0", False))
    return variance_maps(ctx.eps_model, ctx.schedule, x0, f"{ctx.head_kind}_ddpm", ctx.gamma.to(ctx.device),
                         data_range=ctx.data_range, clip_x0=clip, avg_cov=settings.head.avg_cov, seed=settings.seed)


def evaluate(request: EvalRequest | object) -> list[dict]:
    """Run (or resume) the grid into the request's output directory; returns the rows of the whole grid.

    ``request``: an :class:`~.request.EvalRequest`, or the composed Hydra config (parsed into one here).
    Raises :class:`~analytic_dpm.errors.UserError` (bad input; nothing written), :class:`CellsFailed` (after
    recording the grid, when some cells failed).
    """
    if not isinstance(request, EvalRequest):
        request = EvalRequest.from_config(request)  # everything is checked before anything costly runs
    settings = request.settings
    ctx = build_context(request)
    for key, value in ctx.conventions.items():
        log.info("source: %s = %s", key, value)
    methods = grid_methods(settings, ctx)
    try:
        cells = plan_cells(methods, settings.trajectory, settings.K, ctx.schedule.N)
    except ValueError as e:
        raise UserError(str(e)) from None

    run = None

    def on_row(row):
        if run is not None:
            metrics = {f"{m}/{row['method']}/{row['trajectory']}/K{row['K']}": row[c]
                       for m, c in (("nll", "nll_bpd"), ("fid", "fid")) if isinstance(row.get(c), float)}
            run.log(metrics)

    from .modules import build_eval_trainer

    trainer = build_eval_trainer(request.trainer, accelerator="gpu" if ctx.device.type == "cuda" else ctx.device.type)
    writer = trainer.is_global_zero
    out_dir, runner = _resolve_out_dir(
        request.out_dir, lambda store: GridRunner(ctx, store, settings, on_row=on_row, trainer=trainer),
        settings.on_mismatch)
    store = runner.store
    if len(store) and writer:
        log.info("resuming: %d rows found in %s", len(store), out_dir)
    if writer:
        _write_identities(out_dir, runner, methods)
        _write_run_json(out_dir, ctx)
        run = _wandb_run(request.wandb, out_dir)
    try:
        runner.run(cells)
        if not writer:
            return []
        from .report import log_report_to_wandb, write_report

        rows = load_rows(out_dir)
        Ks = [k for k in settings.report_variance_K if k <= ctx.schedule.N]
        bounds = variance_curves(ctx.schedule, ctx.gamma, Ks, ctx.data_range) if Ks else None
        paths = write_report(rows, out_dir, gamma=ctx.gamma.cpu().numpy(), bounds=bounds,
                             abar=ctx.schedule.alphas_cumprod.numpy(), title=f"{ctx.dataset} ({ctx.schedule.name}, "
                             f"N={ctx.schedule.N})", variance_maps=_head_variance_maps(ctx, settings))
        if run is not None:
            log_report_to_wandb(run, rows, paths)
        log.info("results: %s; report: %s", out_dir / "results.csv", paths.get("tables"))
        print((out_dir / "tables.md").read_text() if (out_dir / "tables.md").exists() else "")
    finally:
        if run is not None:
            run.finish()
    if runner.failures:
        raise CellsFailed(f"{len(runner.failures)} cell(s) failed (recorded in {out_dir / 'results.csv'}):\n  "
                          + "\n  ".join(runner.failures))
    return rows


def run_cli(cfg) -> None:
    """The Hydra task of ``evaluate.py``: a user error ends with one ``error: ...`` line and exit code 2, failed
    cells (recorded in the results) with exit code 1."""
    import sys

    with report_user_errors():
        try:
            evaluate(cfg)
        except CellsFailed as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
