"""The evaluation grid (NLL / FID per method x trajectory x K): settings, sources, runner, storage, reports.

* :mod:`.settings`: :class:`EvalSettings`, the ``eval`` config validated once before anything costly.
* :mod:`.setup`: the source of the noise predictor (checkpoint, pretrained model, oracle) and its data.
* :mod:`.grid` + :mod:`.modules`: the cells, run as LightningModules under a ``Trainer`` (one device, DDP, nodes).
* :mod:`.shards`: one cell split across jobs, partial sums and their exact merge.
* :mod:`.results`: :data:`COLUMNS`, :func:`cell_key`, :class:`ResultStore` (durable, locked, resumable results).
* :mod:`.report`: :func:`write_report` (markdown tables, speed-up summary, plots), :func:`log_report_to_wandb`.
* :mod:`.merge`: :func:`merge_runs` and the CLI ``python -m analytic_dpm.evaluation.merge MULTIRUN_DIR``.

``report`` and ``merge`` are imported lazily (matplotlib / wandb stay out of a plain ``import``).
"""

from __future__ import annotations

from typing import Any

from .results import COLUMNS, KEY_COLUMNS, METRIC_COLUMNS, ResultStore, cell_key, load_rows, write_results

_LAZY = {
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
    "ResultStore",
    "cell_key",
    "load_rows",
    "write_results",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
