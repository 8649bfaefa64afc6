"""Storage / merge / report layer of the evaluation grid (analytic_dpm.evaluation)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from analytic_dpm.evaluation import COLUMNS, ResultStore, cell_key, load_rows, write_results
from analytic_dpm.evaluation.merge import main as merge_main
from analytic_dpm.evaluation.merge import merge_runs
from analytic_dpm.evaluation.report import (
    log_report_to_wandb,
    markdown_tables,
    parse_markdown_table,
    speedup_summary,
    summary_metrics,
    write_report,
)

NAN = float("nan")
RUN = {"dataset": "cifar10", "schedule": "linear", "N": 1000}
KS = [10, 25, 50, 100, 200, 400, 1000]
# spec section 10 (CIFAR10, LS, N = 1000)
PAPER_NLL = {
    "ddpm_beta_tilde": [74.95, 24.98, 12.01, 7.08, 5.03, 4.29, 3.73],
    "ddpm_beta": [6.99, 6.11, 5.44, 4.86, 4.39, 4.07, 3.75],
    "analytic_ddpm": [5.47, 4.79, 4.38, 4.07, 3.84, 3.71, 3.59],
}
PAPER_NLL_OT = [4.11, 3.68, 3.61, 3.59, 3.59, 3.59, 3.59]
PAPER_FID = {
    "ddpm_beta_tilde": [44.45, 21.83, 15.21, 10.94, 8.23, 6.43, 5.11],
    "ddpm_beta": [233.41, 125.05, 66.28, 31.36, 12.96, 4.86, 3.04],
    "analytic_ddpm": [34.26, 11.60, 7.25, 5.40, 4.01, 3.62, 4.03],
    "ddim": [21.31, 10.70, 7.74, 6.08, 5.07, 4.61, 4.13],
    "analytic_ddim": [14.00, 5.81, 4.04, 3.55, 3.39, 3.50, 3.74],
}
DDIM_NOTE = "NLL not defined for the DDIM forward process (lambda = 0)"


def row(method, trajectory, K, **kw):
    return {**RUN, "method": method, "trajectory": trajectory, "K": K, **kw}


def paper_rows(nll=True, fid=True):
    rows = []
    for m, fids in PAPER_FID.items():
        for i, k in enumerate(KS):
            r = row(m, "even", k)
            if nll:
                if m in PAPER_NLL:
                    r["nll_bpd"] = PAPER_NLL[m][i]
                else:
                    r.update(nll_bpd=NAN, note=DDIM_NOTE)
            if fid:
                r["fid"] = fids[i]
            rows.append(r)
    if nll:
        rows += [row("analytic_ddpm", "optimal", k, nll_bpd=v) for k, v in zip(KS, PAPER_NLL_OT)]
    return rows


def same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def assert_rows_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(COLUMNS)
        for c in COLUMNS:
            assert same(g[c], w[c]), (c, g[c], w[c])


# ------------------------------------------------------------------------------------------------------------------
# store
# ------------------------------------------------------------------------------------------------------------------


def test_columns_exact_order():
    assert COLUMNS == [
        "dataset", "schedule", "N", "forward", "method", "trajectory", "K", "nll_bpd", "fid",
        "num_nll_images", "num_fid_samples", "gamma_M", "seed", "seconds", "note",
        "model_id", "model_step", "gamma_hash", "precision", "gamma_policy", "version", "nll_id", "fid_id",
        "fid_precision", "head",
    ]  # fmt: skip


def test_store_add_resume_replace(tmp_path):
    store = ResultStore(tmp_path / "run")
    assert store.rows == [] and not store.done(("analytic_ddpm", "even", 10))
    r = store.add(row("analytic_ddpm", "even", 10, nll_bpd=5.47, num_nll_images=10000, seed=0, seconds=1.5))
    assert r["forward"] == "ddpm" and r["fid"] is None and r["note"] == "" and r["gamma_M"] is None
    store.add(row("ddim", "even", 10, nll_bpd=NAN, fid=21.31, note=DDIM_NOTE))

    # a second store on the same directory (a rerun / resume) sees the finished cells
    again = ResultStore.load(tmp_path / "run")
    assert again.done(("analytic_ddpm", "even", 10))
    assert again.done(row("ddim", "even", 10))
    assert again.done(cell_key(row("ddim", "even", 10)))
    assert not again.done(("analytic_ddpm", "even", 25))
    assert not again.done(("analytic_ddpm", "even", 10), metrics=("fid",))  # nll only so far
    assert again.done(("ddim", "even", 10), metrics=("nll_bpd", "fid"))  # NaN counts as computed
    assert_rows_equal(again.rows, store.rows)

    # replacing a row with the same key: one row, the new value
    again.add(row("analytic_ddpm", "even", 10, nll_bpd=5.40))
    third = ResultStore(tmp_path / "run")
    assert len(third) == 2
    assert third.get(("analytic_ddpm", "even", 10))["nll_bpd"] == 5.40
    assert third.get(("analytic_ddpm", "even", 10))["seed"] is None  # replaced, not merged
    # merge=True keeps what the new row leaves empty
    third.add(row("analytic_ddpm", "even", 10, fid=34.26), merge=True)
    got = ResultStore(tmp_path / "run").get(("analytic_ddpm", "even", 10))
    assert (got["nll_bpd"], got["fid"]) == (5.40, 34.26)

    cd = third.cell_dir(("analytic_ddpm", "even", 10))
    assert cd == tmp_path / "run" / "cells" / "analytic_ddpm-even-K10" and cd.is_dir()


def test_store_validation(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(ValueError, match="unknown result columns"):
        store.add(row("ddim", "even", 10, fid=1.0, bogus=1))
    with pytest.raises(ValueError, match="K"):
        store.add({"method": "ddim", "trajectory": "even"})
    assert store.rows == [] and not (tmp_path / "results.json").exists()


def test_files_valid_after_every_add(tmp_path):
    """Crash safety: after each add both files on disk are complete and parse to the rows added so far."""
    store = ResultStore(tmp_path)
    rows = paper_rows()[:12]
    for i, r in enumerate(rows, 1):
        store.add(r)
        doc = json.loads((tmp_path / "results.json").read_text())  # strict JSON (no NaN tokens)
        assert len(doc["rows"]) == i and doc["columns"] == COLUMNS
        with open(tmp_path / "results.csv", newline="") as fh:
            recs = list(csv.reader(fh))
        assert recs[0] == COLUMNS and len(recs) == i + 1
        assert_rows_equal(load_rows(tmp_path / "results.csv"), store.rows)
        assert_rows_equal(load_rows(tmp_path / "results.json"), store.rows)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temp files left behind


def test_nan_none_roundtrip(tmp_path):
    store = ResultStore(tmp_path)
    store.add(row("ddim", "even", 10, nll_bpd=NAN, fid=21.31, note=DDIM_NOTE))  # not defined / computed
    store.add(row("ddpm_beta", "even", 10, nll_bpd=6.99))  # fid not computed
    store.add(row("ddpm_beta_tilde", "even", 10, nll_bpd=float("inf"), fid=0.1 + 0.2))

    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    r0 = doc["rows"][0]
    assert r0["nll_bpd"] is None and r0["nonfinite"] == {"nll_bpd": "nan"} and r0["note"] == DDIM_NOTE
    assert doc["rows"][1]["fid"] is None and "nonfinite" not in doc["rows"][1]

    with open(tmp_path / "results.csv", newline="") as fh:
        recs = list(csv.DictReader(fh))
    assert recs[0]["nll_bpd"] == "nan" and recs[0]["fid"] == "21.31"
    assert recs[1]["fid"] == "" and recs[1]["seed"] == "" and recs[1]["note"] == ""
    assert recs[2]["nll_bpd"] == "inf"

    for path in ("results.json", "results.csv"):
        got = load_rows(tmp_path / path)
        assert math.isnan(got[0]["nll_bpd"]) and got[0]["fid"] == 21.31
        assert got[1]["nll_bpd"] == 6.99 and got[1]["fid"] is None and got[1]["seed"] is None
        assert got[2]["nll_bpd"] == float("inf") and got[2]["fid"] == 0.1 + 0.2  # exact float round-trip
        assert got[0]["N"] == 1000 and isinstance(got[0]["K"], int)


def test_numpy_and_tensor_values(tmp_path):
    import torch

    store = ResultStore(tmp_path)
    r = store.add(row("analytic_ddpm", "even", np.int64(25), nll_bpd=torch.tensor(4.79), fid=np.float32(11.5)))
    assert isinstance(r["K"], int) and isinstance(r["nll_bpd"], float) and r["fid"] == 11.5
    json.loads((tmp_path / "results.json").read_text())


# ------------------------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------------------------


def _fake_sweep(root: Path) -> Path:
    """A Hydra-like multirun: job 0 computed the NLL grid, job 1 (more recent) the FID grid."""
    sweep = root / "multirun" / "2025-01-01" / "12-00-00"
    write_results([{**r, "num_nll_images": 10000, "seconds": 2.0, "gamma_M": 100} for r in paper_rows(fid=False)],
                  sweep / "0")  # fmt: skip
    write_results([{**r, "num_fid_samples": 50000, "seconds": 3.0} for r in paper_rows(nll=False)], sweep / "1")
    os.utime(sweep / "0" / "results.json", (1_000_000, 1_000_000))
    (sweep / ".hydra").mkdir()
    return sweep.parent.parent


def test_merge_two_jobs(tmp_path):
    multirun = _fake_sweep(tmp_path)
    merged = merge_runs([multirun])
    want = {cell_key(r) for r in paper_rows()}
    assert {cell_key(r) for r in merged} == want and len(merged) == len(want)
    by = {(r["method"], r["trajectory"], r["K"]): r for r in merged}
    r = by[("analytic_ddpm", "even", 25)]
    assert (r["nll_bpd"], r["fid"], r["num_nll_images"], r["num_fid_samples"]) == (4.79, 11.60, 10000, 50000)
    assert r["seconds"] == 5.0 and r["gamma_M"] == 100
    r = by[("ddim", "even", 10)]
    assert math.isnan(r["nll_bpd"]) and r["fid"] == 21.31 and r["note"] == DDIM_NOTE
    r = by[("analytic_ddpm", "optimal", 25)]
    assert r["nll_bpd"] == 3.68 and r["fid"] is None


def test_merge_prefers_recent_and_finite(tmp_path):
    old, new = ResultStore(tmp_path / "a"), ResultStore(tmp_path / "b")
    old.add(row("analytic_ddpm", "even", 10, nll_bpd=5.50, fid=30.0))
    new.add(row("analytic_ddpm", "even", 10, nll_bpd=5.47))
    old.add(row("ddpm_beta", "even", 10, nll_bpd=7.0))
    new.add(row("ddpm_beta", "even", 10, nll_bpd=NAN, note="diverged"))
    os.utime(tmp_path / "a" / "results.json", (1_000_000, 1_000_000))
    merged = {(r["method"], r["K"]): r for r in merge_runs([tmp_path / "a", tmp_path / "b"])}
    assert merged[("analytic_ddpm", 10)]["nll_bpd"] == 5.47  # most recent
    assert merged[("analytic_ddpm", 10)]["fid"] == 30.0  # only the old job has it
    assert merged[("ddpm_beta", 10)]["nll_bpd"] == 7.0  # a number beats NaN


def test_merge_cli(tmp_path, capsys):
    multirun = _fake_sweep(tmp_path)
    assert merge_main([str(multirun), "--no-plots", "--title", "sweep"]) == 0
    out = multirun / "merged"
    for name in ("results.csv", "results.json", "tables.md", "speedup.md", "speedup.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.png"))
    assert_rows_equal(load_rows(out), merge_runs([multirun]))
    assert len(load_rows(out / "results.csv")) == len(paper_rows())
    assert "from 2 result files" in capsys.readouterr().out
    # rerunning does not read its own output back in
    assert merge_main([str(multirun), "--no-plots", "--out", str(out)]) == 0
    assert "from 2 result files" in capsys.readouterr().out
    assert merge_main([str(tmp_path / "multirun" / "2025-01-01" / "12-00-00" / ".hydra")]) == 2


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------


def test_markdown_tables_numbers():
    text = markdown_tables(paper_rows(), title="CIFAR10 LS")
    nll = parse_markdown_table(text, "NLL (bits/dim), even trajectory")
    assert list(nll) == ["ddpm_beta", "ddpm_beta_tilde", "analytic_ddpm", "ddim", "analytic_ddim"]
    for m, vals in PAPER_NLL.items():
        assert [nll[m][k] for k in KS] == [f"{v:.2f}" for v in vals]
    assert all(nll["ddim"][k] == "n/a" for k in KS)
    assert DDIM_NOTE in text  # the footnote gives the reason
    ot = parse_markdown_table(text, "NLL (bits/dim), optimal trajectory")
    assert list(ot) == ["analytic_ddpm"] and ot["analytic_ddpm"][25] == "3.68"
    fid = parse_markdown_table(text, "FID, even trajectory")
    assert fid["ddpm_beta"][10] == "233.41" and fid["analytic_ddim"][50] == "4.04"
    assert "**3.04**" in text  # best FID at K = 1000 in bold
    assert "FID, optimal trajectory" not in text  # no FID values there

    assert "Network precision" not in text  # rows that record none
    mixed = markdown_tables([row("analytic_ddpm", "even", 10, nll_bpd=5.47, precision="fp32"),
                             row("ddim", "even", 10, fid=10.7, precision="fp32", fid_precision="bf16")])
    assert "Network precision: NLL fp32; FID sampling bf16." in mixed
    same = markdown_tables([row("analytic_ddpm", "even", 10, nll_bpd=5.47, fid=9.1, precision="tf32",
                                fid_precision="tf32")])
    assert "Network precision: tf32." in same
    partial = markdown_tables([row("analytic_ddpm", "even", 10, nll_bpd=5.47), row("ddim", "even", 25, fid=10.7)])
    t = parse_markdown_table(partial, "FID, even")
    assert t["analytic_ddpm"] == {10: "-", 25: "-"} and t["ddim"] == {10: "-", 25: "10.70"}


def test_speedup_paper_example():
    """Spec section 10: OT analytic_ddpm reaches 3.68 <= 3.73 (ddpm_beta_tilde at K = 1000) at K = 25 -> 40x."""
    entries = speedup_summary(paper_rows())
    get = {(e["metric"], e["method"], e["trajectory"], e["reference"]): e for e in entries}
    e = get[("nll_bpd", "analytic_ddpm", "optimal", "best baseline")]
    assert e["status"] == "reached" and e["K"] == 25 and e["speedup"] == 40.0 and e["value"] == 3.68
    assert (e["baseline_method"], e["baseline_K"], e["baseline_value"]) == ("ddpm_beta_tilde", 1000, 3.73)
    e = get[("nll_bpd", "analytic_ddpm", "even", "best baseline")]
    assert (e["K"], e["speedup"]) == (400, 2.5)
    assert get[("nll_bpd", "analytic_ddim", "even", "best baseline")]["status"] == "not defined"
    # FID: nothing beats ddpm_beta's 3.04 at K = 1000 ...
    e = get[("fid", "analytic_ddim", "even", "best baseline")]
    assert e["status"] == "not reached" and e["K"] is None and e["baseline_method"] == "ddpm_beta"
    # ... but analytic_ddim reaches ddim's 4.13 at K = 50: the paper's 20x
    e = get[("fid", "analytic_ddim", "even", "same forward")]
    assert (e["status"], e["K"], e["speedup"], e["baseline_method"]) == ("reached", 50, 20.0, "ddim")
    assert ("fid", "analytic_ddpm", "even", "same forward") not in get  # same cell as the best baseline


def test_write_report_files(tmp_path):
    N = 1000
    gamma = np.concatenate([[0.0], np.linspace(0.01, 1.0, N)])
    abar = np.concatenate([[1.0], np.cumprod(1 - np.linspace(1e-4, 0.02, N))])
    t = np.arange(2, 11)
    bounds = {10: {"t": t, "lower": 1e-4 * t, "upper": 3e-4 * t, "analytic_ddpm": 2e-4 * t, "ddim": 0 * t}}
    paths = write_report(paper_rows(), tmp_path / "rep", gamma=gamma, bounds=bounds, title="CIFAR10", abar=abar)
    expected = {
        "tables", "speedup_md", "speedup_json", "nll_vs_K", "fid_vs_K", "heatmap_nll_even",
        "heatmap_nll_optimal", "heatmap_fid_even", "gamma", "variance_bounds",
    }  # fmt: skip
    assert set(paths) == expected
    for name, p in paths.items():
        assert p.is_file() and p.stat().st_size > 0, name
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sp = json.loads(paths["speedup_json"].read_text())
    assert any(e["trajectory"] == "optimal" and e["speedup"] == 40.0 for e in sp)
    assert "| nll | analytic_ddpm | optimal | best baseline | 25 | 40x |" in paths["speedup_md"].read_text()

    # metrics without values are skipped, and no gamma/bounds means no such plots
    paths = write_report([row("ddim", "even", 10, fid=21.3)], tmp_path / "rep2")
    assert "nll_vs_K" not in paths and "fid_vs_K" in paths and "gamma" not in paths


def test_several_groups(tmp_path):
    rows = [
        row("analytic_ddpm", "even", 10, nll_bpd=5.47),
        {**row("analytic_ddpm", "even", 10, nll_bpd=4.0), "N": 4000},
    ]
    paths = write_report(rows, tmp_path, plots=False)
    text = paths["tables"].read_text()
    assert "## cifar10, linear, N = 1000" in text and "## cifar10, linear, N = 4000" in text
    keys = summary_metrics(rows)
    assert keys["cifar10-linear-N1000/nll/analytic_ddpm/even/K10"] == 5.47
    assert keys["cifar10-linear-N4000/nll/analytic_ddpm/even/K10"] == 4.0
    assert set(paths) == {"tables", "speedup_md", "speedup_json"}
    import analytic_dpm.evaluation as ev

    assert ev.write_report is write_report and ev.merge_runs is merge_runs  # lazy package attributes


# ------------------------------------------------------------------------------------------------------------------
# W&B (offline)
# ------------------------------------------------------------------------------------------------------------------


def test_wandb_offline_table(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    rows = paper_rows()
    tables = tmp_path / "rep"
    tables.mkdir()
    paths = {"tables": tables / "tables.md"}
    paths["tables"].write_text(markdown_tables(rows))
    run = wandb.init(mode="offline", dir=str(tmp_path), project="analytic-dpm-test")
    try:
        payload = log_report_to_wandb(run, rows, paths)
        assert {"results", "speedup", "report/tables"} <= set(payload)
        assert run.summary["nll/analytic_ddpm/optimal/K25"] == 3.68
        assert run.summary["speedup/nll/analytic_ddpm/optimal"] == 40.0
    finally:
        run.finish()
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    table_files = list(run_dirs[0].glob("files/media/table/results_*.table.json"))
    assert table_files, sorted(str(p) for p in run_dirs[0].rglob("*"))
    table = json.loads(table_files[0].read_text())
    assert table["columns"] == COLUMNS and len(table["data"]) == len(rows)
    assert summary_metrics(rows)["fid/analytic_ddim/even/K50"] == 4.04
