"""``evaluate(cfg)``: the run behind ``evaluate.py`` (Hydra config ``conf/evaluate.yaml``)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .grid import GridRunner, plan_cells, variance_curves
from .results import ResultStore
from .setup import UserError, build_context

log = logging.getLogger(__name__)


def _wandb_run(cfg: DictConfig, out_dir: Path):
    mode = str(cfg.wandb.mode)
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(mode=mode, project=cfg.wandb.project, name=cfg.wandb.name, group=cfg.wandb.group or None,
                      dir=str(out_dir), job_type="evaluate", tags=list(cfg.tags or []),
                      config=OmegaConf.to_container(cfg, resolve=True))


def evaluate(cfg: DictConfig) -> list[dict]:
    """Run (or resume) the grid into the Hydra run directory; returns the rows of the whole grid."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out_dir)
    if len(store):
        log.info("resuming: %d finished rows found in %s", len(store), out_dir)
    ctx = build_context(cfg)
    e = cfg.eval
    cells = plan_cells(e.method, e.trajectory, e.K, ctx.schedule.N)
    run = _wandb_run(cfg, out_dir)
    try:
        def on_row(row):
            if run is not None:
                metrics = {f"{m}/{row['method']}/{row['trajectory']}/K{row['K']}": row[c]
                           for m, c in (("nll", "nll_bpd"), ("fid", "fid")) if isinstance(row.get(c), float)}
                run.log(metrics)

        GridRunner(ctx, store, OmegaConf.to_container(e, resolve=True), on_row=on_row).run(cells)
        from .report import log_report_to_wandb, write_report

        Ks = [int(k) for k in (e.report.variance_K or []) if int(k) <= ctx.schedule.N]
        bounds = variance_curves(ctx.schedule, ctx.gamma, Ks, ctx.data_range) if Ks else None
        paths = write_report(store.rows, out_dir, gamma=ctx.gamma.cpu().numpy(), bounds=bounds,
                             abar=ctx.schedule.alphas_cumprod.numpy(), title=f"{ctx.dataset} ({ctx.schedule.name}, "
                             f"N={ctx.schedule.N})")
        if run is not None:
            log_report_to_wandb(run, store.rows, paths)
        log.info("results: %s; report: %s", out_dir / "results.csv", paths.get("tables"))
        print((out_dir / "tables.md").read_text() if (out_dir / "tables.md").exists() else "")
        return store.rows
    finally:
        if run is not None:
            run.finish()


def run_cli(cfg: DictConfig):
    from ..data import DatasetNotAvailableError

    try:
        return evaluate(cfg)
    except (UserError, DatasetNotAvailableError) as err:  # the message says what to do; no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
