"""Provenance: what a number of the evaluation grid depends on, defined once and asked everywhere else.

A result row records (:data:`IDENTITY_COLUMNS`) the run that produced it (``model_id``, ``model_step``,
``gamma_hash`` + ``gamma_M``, ``seed``, ``precision``, ``gamma_policy``, ``version``) and, per metric, an id that
hashes everything that determines that metric's value (``nll_id`` / ``fid_id``: the run identity plus the metric's
own settings: number of images or samples, batch sizes, decoder, reference statistics, Inception weights, ...).
``identities.json`` spells each id out.

The rules, all here:

* :func:`run_identity`: the run's identity (what every number of the run depends on), stored in the context.
* :class:`Provenance`: per metric the identity and its id (:meth:`~Provenance.nll_identity`,
  :meth:`~Provenance.fid_identity`), the identity columns of a row (:meth:`~Provenance.row`), and the conflicts a
  rerun refuses (:meth:`~Provenance.conflicts`: stored values this run would not have produced).
* :func:`check_same_run`: the rule ``merge`` applies (rows of one merged grid come from one run identity,
  :data:`RUN_IDENTITY`). A rerun also checks :data:`DIRECTORY_GROUP`: a run directory holds one grid of one dataset
  and N, while a merged report may hold several (one section each).
* Compatibility ("absent when equal"): options added after results existed enter an identity only when they differ
  from the behaviour before them, so older ids stay valid and a rerun reuses older results:
  ``sample_precision`` (FID sampling at its own precision) only when it differs from the run's precision;
  ``feature_options`` of the Inception only when not the defaults; ``precision`` of a cached Gamma only when not
  fp32; ``gamma_M`` of a Gamma read from the user's file (``eval.gamma_path``) enters as None, as before files
  recorded their M (the Gamma itself is identified by ``gamma_hash``).

Adding an option that changes results: parse it in :mod:`.settings`, add it to the identity it belongs to here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import __version__
from ..identity import digest_json, digest_state_dict, digest_tensor, short
from .context import Cell, EvalContext
from .settings import EvalSettings

__all__ = [
    "DIRECTORY_GROUP",
    "IDENTITY_COLUMNS",
    "ID_COLUMNS",
    "RUN_IDENTITY",
    "Provenance",
    "check_same_run",
    "checkpoint_model_id",
    "fid_features_identity",
    "gamma_cache_key",
    "oracle_model_id",
    "pair_costs_key",
    "precision_label",
    "pretrained_model_id",
    "run_identity",
]

#: the identity columns of a result row (in CSV order, after the cell and metric columns) and their types
IDENTITY_COLUMNS: dict[str, type] = {
    "model_id": str, "model_step": int, "gamma_hash": str, "precision": str, "gamma_policy": str, "version": str,
    "nll_id": str, "fid_id": str, "fid_precision": str, "head": str,
}  # fmt: skip
#: metric column -> the column holding the id of the computation that produced it
ID_COLUMNS: dict[str, str] = {"nll_bpd": "nll_id", "fid": "fid_id"}
#: columns that say which model / Gamma / settings produced a row: rows of one grid (a run directory, a merge) agree
RUN_IDENTITY: tuple[str, ...] = ("model_id", "gamma_hash", "seed", "precision", "gamma_policy", "version")
#: a run directory holds the grid of one dataset and N (a merged report may hold several groups)
DIRECTORY_GROUP: tuple[str, ...] = ("dataset", "N")
_COLUMN_TYPES = {**IDENTITY_COLUMNS, "dataset": str, "N": int, "seed": int}


def precision_label(precision: str, eps_model) -> str:
    """``precision`` as recorded in results: ``bf16-attn`` when bf16 also reaches the UNet's self-attention
    (``attention_float32`` off), which moves the numbers further than bf16 with float32 attention."""
    from ..nets import attention_in_float32

    if precision == "bf16" and isinstance(eps_model, torch.nn.Module) and attention_in_float32(eps_model) is False:
        return "bf16-attn"
    return precision


def checkpoint_model_id(model, model_cfg, schedule) -> str:
    """``model_id`` of a trained network: its weights, its architecture config and its noise schedule."""
    return short(digest_json({"weights": digest_state_dict(model), "model": model_cfg,
                              "schedule": digest_tensor(schedule.betas)}))


def pretrained_model_id(identity: Mapping) -> str:
    """``model_id`` of a pretrained network: the identity its loader built (kind, weights sha256, options...)."""
    return short(digest_json({"pretrained": identity}))


def oracle_model_id(params: Mapping, schedule) -> str:
    """``model_id`` of an exact oracle: its parameters and schedule. List values enter by their text (``"[1, 8, 8]"``),
    as they always have, and ``head: null`` is left out (absent when equal), so results computed before stay valid."""
    text = {k: repr(list(v)) if isinstance(v, (list, tuple)) else v for k, v in params.items()
            if not (k == "head" and v is None)}
    return short(digest_json({"oracle": text, "schedule": digest_tensor(schedule.betas)}))


def run_identity(s: EvalSettings, *, model_id: str, model_step, gamma: torch.Tensor, gamma_M, dataset: str,
                 precision: str | None = None, gamma_from_file: bool = False, head: str | None = None) -> dict:
    """The identity of a run: everything each of its numbers depends on besides the metric's own settings.

    ``gamma_from_file``: the Gamma came from the user's file (``eval.gamma_path``); its M is recorded in the rows'
    ``gamma_M`` but enters the identity as None (module docstring). ``head``: the model's covariance head
    (``"npr:simple"``, ...), absent for a model without one (so the ids of such models are as before heads)."""
    ident = {
        "dataset": dataset, "model_id": model_id, "model_step": model_step, "gamma_hash": short(digest_tensor(gamma)),
        "gamma_M": None if gamma_from_file else gamma_M, "seed": s.seed, "precision": precision or s.precision,
        "gamma_policy": s.gamma_policy, "quadratic_duplicates": s.quadratic_duplicates, "eta": s.eta,
        "clip_x0": s.clip_x0, "version": __version__,
    }
    if head:
        ident["head"] = head
    return ident


def pair_costs_key(ctx: EvalContext, s: EvalSettings, method: str) -> dict:
    """What the pair-cost table of a head method's optimal trajectory is computed from (spec section 11): the model
    (its identity), the training data, the head kind, avg_cov, the x0 clamp and data range, the number of images and
    the seed. Its digest names the cached table and enters the identity of the rows the table's trajectory makes."""
    from ..methods import head_kind

    return {"model_id": ctx.identity.get("model_id"), "head": ctx.identity.get("head"),
            "train_data": ctx.train_digest, "kind": head_kind(method), "avg_cov": s.head.avg_cov,
            "clip_x0": s.nll.clip_x0 if ctx.is_image else False, "data_range": ctx.data_range,
            "num_images": s.head.cost_images, "seed": s.seed, "precision": ctx.identity.get("precision")}


def fid_features_identity(metric, reference: Mapping[str, Any]) -> dict:
    """The FID's own identity: the Inception weights, the reference statistics, and ``feature_options`` (e.g.
    ``"bf16"``) only when the Inception runs with non-default options. (``eval.fid.feature_batch_size`` is not part of
    it: the network treats images independently, a batch size only changes float32 rounding.)"""
    identity = {"weights": metric.weights_id, "reference": dict(reference)}
    return {**identity, "feature_options": metric.options_id} if metric.options_id else identity


def gamma_cache_key(model_identity: Mapping, train_data_digest: str, s: EvalSettings, precision: str) -> dict:
    """What a cached Gamma of a pretrained model was computed from: the model, the training data, M, the batch, the
    seed, and the network's precision (absent at fp32: Gamma cached before precisions existed stays valid)."""
    key = {"model": dict(model_identity), "train_data": train_data_digest, "M": s.calibration.num_samples,
           "batch_size": s.calibration.batch_size, "seed": s.seed}
    if precision != "fp32":
        key["precision"] = precision
    return key


def _as_stored(column: str, value: Any) -> Any:
    """``value`` as a results file stores it (strings: "" for None; integers: None or int)."""
    kind = _COLUMN_TYPES.get(column)
    if kind is str:
        return "" if value is None else str(value)
    if kind is int:
        return None if value is None or value == "" else int(value)
    return value


class Provenance:
    """The identities of one run's numbers (context + settings); :class:`~.grid.GridRunner` asks it, never computes.

    It reads the context when asked (not a snapshot), so a context completed later (FID precision) is seen.
    """

    def __init__(self, ctx: EvalContext, settings: EvalSettings):
        self.ctx, self.s = ctx, settings

    # ------------------------------------------------------------------ per metric
    def _head_part(self, method: str | None, trajectory: str | None) -> dict:
        """What a head method's numbers depend on besides the run: avg_cov, and on the optimal trajectory the
        pair-cost table (its key's digest). Empty for the isotropic methods (their ids are as before heads)."""
        from ..methods import head_kind

        if method is None or head_kind(method) is None:
            return {}
        part: dict[str, Any] = {"avg_cov": self.s.head.avg_cov}
        if trajectory == "optimal":
            part["pair_costs"] = short(digest_json(pair_costs_key(self.ctx, self.s, method)))
        return part

    def nll_identity(self, method: str | None = None, trajectory: str | None = None) -> dict:
        n = self.ctx.num_heldout if self.s.nll.num_images is None else min(self.s.nll.num_images,
                                                                           self.ctx.num_heldout)
        return {**self.ctx.identity, "metric": "nll", "num_images": n, "batch_size": self.s.nll.batch_size,
                "network_batch": self.s.nll.network_batch, "nll_options": self.ctx.nll_options,
                **self._head_part(method, trajectory)}

    def fid_identity(self, method: str, trajectory: str | None = None) -> dict:
        f = self.s.fid
        ident = {**self.ctx.identity, "metric": "fid", "num_samples": f.num_samples, "batch_size": f.batch_size,
                 "clip_sigma_y": f.clip_sigma_y.get(method), "features": getattr(self.ctx.fid, "identity", None),
                 **self._head_part(method, trajectory)}
        sampling = self.ctx.fid_precision
        if sampling and sampling != self.ctx.identity.get("precision"):  # absent when equal: older fid_ids stay
            ident["sample_precision"] = sampling
        return ident

    def nll_id(self, method: str | None = None, trajectory: str | None = None) -> str:
        return short(digest_json(self.nll_identity(method, trajectory)))

    def fid_id(self, method: str, trajectory: str | None = None) -> str:
        return short(digest_json(self.fid_identity(method, trajectory)))

    def metric_id(self, metric: str, method: str, trajectory: str | None = None) -> str:
        """The id a ``metric`` (``nll_bpd`` / ``fid``) of ``method`` on ``trajectory`` computed by this run has (""
        for an FID that cannot be computed now: no Inception weights)."""
        if metric == "nll_bpd":
            return self.nll_id(method, trajectory)
        return self.fid_id(method, trajectory) if self.ctx.fid is not None else ""

    def identities(self, methods=None) -> dict[str, dict]:
        """id -> the full identity it hashes, for ``identities.json`` (what produced each number, readable)."""
        methods = list(methods if methods is not None else self.s.method)
        out: dict[str, dict] = {}
        for m in methods:
            for traj in self.s.trajectory:
                if "nll" in self.s.metrics:
                    out[self.nll_id(m, traj)] = self.nll_identity(m, traj)
                if "fid" in self.s.metrics and self.ctx.fid is not None:
                    out[self.fid_id(m, traj)] = self.fid_identity(m, traj)
        return out

    def run_id(self) -> str:
        """A short name of this run's identity (the directory ``eval.on_mismatch=new_dir`` writes into)."""
        return short(digest_json(sorted(self.identities())))

    # ------------------------------------------------------------------ rows
    def row(self, cell: Cell) -> dict:
        """The cell and identity columns of a result row of ``cell`` (metric columns are the runner's)."""
        i, ctx = self.ctx.identity, self.ctx
        return dict(dataset=ctx.dataset, schedule=ctx.schedule.name, N=ctx.schedule.N, forward=cell.forward,
                    method=cell.method, trajectory=cell.trajectory, K=cell.K, gamma_M=ctx.gamma_M, seed=self.s.seed,
                    model_id=i.get("model_id"), model_step=i.get("model_step"), gamma_hash=i.get("gamma_hash"),
                    precision=i.get("precision"), gamma_policy=self.s.gamma_policy, version=i.get("version"),
                    head=i.get("head"))

    def conflicts(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Stored values among ``rows`` that this run would not have produced (another model, Gamma, seed, settings,
        version, dataset, N, or metric settings): a rerun refuses them (or writes elsewhere), never shows them."""
        mine = self.row(Cell("ddpm_beta", "even", 1))
        run_cols = {c: _as_stored(c, mine[c]) for c in (*RUN_IDENTITY, *DIRECTORY_GROUP)}
        out: list[str] = []
        for row in rows:
            if row["nll_bpd"] is None and row["fid"] is None:
                continue
            where = f"{row['method']}/{row['trajectory']}/K={row['K']}"
            diffs = [f"{c} {row[c]!r} (now {v!r})" for c, v in run_cols.items() if row.get(c) != v]
            if diffs:
                out.append(f"{where}: {', '.join(diffs)}")
                continue
            known = self._known(row["method"])
            nll_id = self.nll_id(row["method"], row["trajectory"]) if known else self.nll_id()
            if "nll" in self.s.metrics and row["nll_bpd"] is not None and row["nll_id"] != nll_id:
                out.append(f"{where}: NLL computed with other NLL settings (nll_id {row['nll_id'] or '-'}, now "
                           f"{nll_id}; e.g. num_nll_images {row['num_nll_images']})")
            if ("fid" in self.s.metrics and self.ctx.fid is not None and row["fid"] is not None and known
                    and row["fid_id"] != self.fid_id(row["method"], row["trajectory"])):
                out.append(f"{where}: FID computed with other FID settings (fid_id {row['fid_id'] or '-'}, now "
                           f"{self.fid_id(row['method'], row['trajectory'])}; e.g. num_fid_samples "
                           f"{row['num_fid_samples']})")
        return out

    @staticmethod
    def _known(method: str) -> bool:
        from ..methods import check_method

        try:
            check_method(method)
        except ValueError:
            return False
        return True


def check_same_run(sources: Sequence[tuple[Any, Sequence[Mapping[str, Any]]]], names: Sequence[str]) -> None:
    """Raise ValueError when the rows of ``sources`` (``[(recency, rows), ...]``) come from different models, Gamma
    or settings (:data:`RUN_IDENTITY`): one grid must not mix them; ``names`` label the sources in the message."""
    seen: dict[tuple, str] = {}
    for name, (_, rows) in zip(names, sources):
        for row in rows:
            if all(row.get(c) in (None, "") for c in ("nll_bpd", "fid", "nll_id", "fid_id")):
                continue
            ident = tuple(row.get(c) for c in RUN_IDENTITY)
            seen.setdefault(ident, name)
    if len(seen) > 1:
        lines = [f"{name}: " + ", ".join(f"{c}={v!r}" for c, v in zip(RUN_IDENTITY, ident))
                 for ident, name in seen.items()]
        raise ValueError("these results come from different models, Gamma or settings and cannot form one grid:\n  "
                         + "\n  ".join(lines) + "\nmerge them separately, or pass --allow-mixed to keep the newest "
                         "value of each cell")
