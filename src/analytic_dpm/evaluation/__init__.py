"""The evaluation grid (NLL / FID per method x trajectory x K) and how a number gets there.

    cfg -> EvalRequest (settings, source, data, trainer, W&B, out dir)            request.py, settings.py
        -> EvalContext (network from the source, Gamma, FID reference)            sources.py, gammas.py, reference.py
        -> GridRunner (plan, skip what is done; Provenance says what a number depends on)   grid.py, provenance.py
        -> Lightning modules under a Trainer (one device, DDP, nodes; shard jobs)  modules.py, shards.py
        -> ResultStore (results.csv/json, locked, resumable)                      results.py
        -> report (tables, speed-up, plots, W&B) / merge of many run directories  report.py, merge.py

From Python::

    from analytic_dpm.evaluation import EvalRequest, evaluate
    rows = evaluate(cfg)                       # a composed conf/evaluate.yaml (or an EvalRequest)

    ctx = build_context(request)               # or build an EvalContext by hand (any eps_model)
    runner = GridRunner(ctx, ResultStore(out_dir), request.settings)
    runner.run(plan_cells(["analytic_ddpm"], ["even"], [10, 100], ctx.schedule.N))

``report`` and ``merge`` are imported lazily (matplotlib / wandb stay out of a plain ``import``).
"""

from __future__ import annotations

import importlib
from typing import Any

from .context import Cell, EvalContext, FidContext
from .grid import GridRunner, plan_cells
from .provenance import Provenance
from .request import CheckpointSource, EvalRequest, OracleSource, PretrainedSource
from .results import COLUMNS, KEY_COLUMNS, METRIC_COLUMNS, ResultStore, cell_key, load_rows, write_results
from .settings import EvalSettings, SettingsError

_LAZY = {
    "evaluate": "run",
    "build_context": "sources",
    "write_report": "report",
    "speedup_summary": "report",
    "markdown_tables": "report",
    "parse_markdown_table": "report",
    "summary_metrics": "report",
    "log_report_to_wandb": "report",
    "merge_runs": "merge",
    "merge_rows": "merge",
    "find_result_files": "merge",
}

__all__ = [
    "COLUMNS",
    "KEY_COLUMNS",
    "METRIC_COLUMNS",
    "Cell",
    "CheckpointSource",
    "EvalContext",
    "EvalRequest",
    "EvalSettings",
    "FidContext",
    "GridRunner",
    "OracleSource",
    "PretrainedSource",
    "Provenance",
    "ResultStore",
    "SettingsError",
    "cell_key",
    "load_rows",
    "plan_cells",
    "write_results",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
