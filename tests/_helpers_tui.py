"""A fixture experiment store for the TUI tests, built only through the `store.Store` API.

It holds what one `gfattn pipeline` run records (docs/architecture.md, "How the pipeline uses runs"): a completed
pipeline run with a data run, six fine-tuning runs, a DE run (tasks `dose` and `lowhigh` x modes frozen, unfrozen,
last-1) and two analysis runs ("frozen vs unfrozen") with grids, per-rank vectors, gene tables (20,000
genes for `lowhigh`) and DE overlap; plus a running run (this process), a failed run, a lost run (a
finished process that never ended its run) and, on request, many more completed runs. Time is frozen
while building, so timestamps, and every duration derived from them, are the same on every build.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from tests import REPO

T0 = 1_717_243_200.0  # 2024-06-01 12:00:00 UTC
NOW = T0 + 7 * 86_400  # the clock the app is given in tests: a week after the fixture runs
DOSES = ["0", "1.25", "2.5", "12.5", "25"]
LOWHIGH = ["low", "high"]
MODES = ["frozen", "unfrozen", "last-1"]
REFERENCE_GENES = ["MDM2", "CDKN1A", "BAX", "FAS", "GDF15", "TP53I3", "RRM2B", "SESN1", "ZMAT3", "TNFRSF10B"]


class FrozenClock:
    """Stands in for `time.time` while the store is written; `advance` moves it on."""

    def __init__(self, start: float):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


@contextmanager
def frozen_time(start: float):
    clock = FrozenClock(start)
    with mock.patch("time.time", clock):
        yield clock


@dataclass
class FixtureIds:
    path: Path
    pipeline: int = 0
    data: int = 0
    finetunes: dict[str, int] = field(default_factory=dict)
    analyses: dict[str, int] = field(default_factory=dict)
    de: int = 0
    running: int = 0
    failed: int = 0
    lost: int = 0
    extra: list[int] = field(default_factory=list)


def _confusion(rng: np.random.Generator, n_classes: int, accuracy: float, per_class: int = 40) -> np.ndarray:
    m = np.zeros((n_classes, n_classes), dtype=int)
    for i in range(n_classes):
        correct = int(round(per_class * accuracy))
        m[i, i] = correct
        for _ in range(per_class - correct):
            j = int(np.clip(i + rng.choice([-1, 1]), 0, n_classes - 1))
            m[i, j] += 1
    return m


def _finetune(st, parent: int, task: str, mode: str, rng, clock: FrozenClock, *, epochs: int = 3) -> int:
    labels = DOSES if task == "dose" else LOWHIGH
    rid = st.create_run(
        f"{task}/{mode}",
        "finetune",
        {"task": task, "mode": mode, "epochs": epochs, "lr": 5e-5},
        parent_id=parent,
        device="cpu",
    )
    st.put_labels(rid, task, labels)
    skill = {"frozen": 0.45, "unfrozen": 0.8, "last-1": 0.65}[mode] + (0.12 if task == "lowhigh" else 0.0)
    rows, step = [], 0
    for epoch in range(1, epochs + 1):
        for _ in range(10):
            step += 1
            loss = 1.6 * np.exp(-step * skill / 12) + 0.05 * rng.random()
            rows.append({"name": "loss", "value": float(loss), "step": step, "epoch": epoch, "split": "train"})
        acc = min(0.98, skill * (0.7 + 0.1 * epoch))
        rows.append({"name": "accuracy", "value": acc, "epoch": epoch, "step": step, "split": "validation"})
        rows.append({"name": "macro_f1", "value": acc - 0.03, "epoch": epoch, "step": step, "split": "validation"})
        rows.append({"name": "loss", "value": 1.4 - acc, "epoch": epoch, "step": step, "split": "validation"})
    st.log_metrics(rid, rows)
    m = _confusion(rng, len(labels), min(0.97, skill))
    # stored in class-index order that is not dose order, as a label encoder may produce
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    st.put_confusion(rid, [labels[i] for i in order], m[np.ix_(order, order)], split="test")
    acc = float(np.trace(m) / m.sum())
    test = [
        {"name": "accuracy", "value": acc, "split": "test"},
        {"name": "macro_f1", "value": acc - 0.02, "split": "test"},
    ]
    for i, label in enumerate(labels):
        test.append({"name": f"precision/{label}", "value": float(m[i, i] / max(m[:, i].sum(), 1)), "split": "test"})
        test.append({"name": f"recall/{label}", "value": float(m[i, i] / max(m[i, :].sum(), 1)), "split": "test"})
    st.log_metrics(rid, test)
    clock.advance(95)
    st.finish_run(rid, "completed")
    return rid


def _gene_table(rng: np.random.Generator, n_genes: int):
    import pandas as pd

    symbols = [f"GENE{i:05d}" for i in range(n_genes)]
    for i, sym in enumerate(REFERENCE_GENES):
        symbols[i * 7 + 3] = sym
    attn_a = rng.gamma(1.2, 1.0, n_genes)
    attn_b = attn_a * rng.lognormal(0, 0.3, n_genes)
    n_cells = rng.integers(1, 400, n_genes)
    in_ref = np.isin(symbols, REFERENCE_GENES).astype(int)
    return pd.DataFrame(
        {
            "ensembl_id": [f"ENSG{i:011d}" for i in range(n_genes)],
            "symbol": symbols,
            "attn_a": attn_a,
            "attn_b": attn_b,
            "attn_scaled_a": attn_a / attn_a.max(),
            "attn_scaled_b": attn_b / attn_b.max(),
            "per_occurrence_a": attn_a / n_cells,
            "per_occurrence_b": attn_b / n_cells,
            "pos_ctrl_a": attn_a * rng.uniform(0.8, 1.2, n_genes),
            "n_cells": n_cells,
            "rank_mean": rng.uniform(1, 600, n_genes),
            "rank_std": rng.uniform(0, 120, n_genes),
            "de_score": rng.normal(0, 2, n_genes) + 6 * in_ref,
            "in_reference_set": in_ref,
        }
    )


def _analysis(st, parent: int, task: str, rng, clock: FrozenClock, n_genes: int, median_len: int) -> int:
    rid = st.create_run(
        f"{task}: frozen vs unfrozen",
        "analysis",
        {"task": task, "a": "frozen", "b": "unfrozen"},
        parent_id=parent,
        device="cpu",
    )
    layers, heads = 6, 4
    cosine = np.clip(0.95 - 0.08 * np.arange(layers)[:, None] - 0.02 * rng.random((layers, heads)), 0, 1)
    spread = 0.01 + 0.02 * rng.random((layers, heads))
    st.put_grid(rid, "cosine", cosine, lower=cosine - spread, upper=cosine + spread)
    st.put_grid(rid, "cosine_std", spread * 3)
    st.put_grid(rid, "norm_a", 1 + rng.random((layers, heads)))
    st.put_grid(rid, "norm_b", 1.2 + rng.random((layers, heads)))
    ranks = np.arange(1, 257, dtype=float)
    received_a = 40 / ranks**0.6
    received_b = received_a * (1 + 0.3 * np.exp(-ranks / 40))
    st.put_vector(rid, "rank_received_a", received_a)
    st.put_vector(rid, "rank_received_b", received_b)
    st.put_vector(rid, "rank_pct_diff", 100 * (received_b - received_a) / received_a)
    st.put_vector(rid, "rank_log_ratio", np.log(received_b / received_a))
    counts = np.bincount(rng.normal(median_len, 30, 500).astype(int).clip(0, 255) // 16, minlength=16)
    meta = {"edges": list(range(0, 257, 16)), "median": median_len}
    st.put_vector(rid, "length_hist", counts.astype(float), meta=meta)
    st.put_gene_table(rid, "genes", _gene_table(rng, n_genes))
    st.put_json(
        rid,
        "de_overlap",
        {
            "groups": ["high", "low"],
            "genes_tested": n_genes,
            "overlap": [
                {"k": k, "overlap": int(k * 0.3), "expected": round(k * k / n_genes, 3), "p_value": 10.0 ** (-k / 10)}
                for k in (10, 20, 50, 100)
            ],
            "spearman": {"rho": 0.41, "p_value": 1.2e-8},
            "reference_set": {"name": "fischer2017_p53_targets", "in_top_100": 6, "p_value": 3.4e-5},
        },
    )
    st.put_json(rid, "stats", {"cosine_mean": float(cosine.mean()), "n_test_cells": 120})
    clock.advance(40)
    st.finish_run(rid, "completed")
    return rid


def _de_run(st, parent: int, rng, clock: FrozenClock, n_genes: int) -> int:
    """The DE child: scanpy's Wilcoxon table (high vs low) over the genes of the key-gene tables."""
    import pandas as pd

    rid = st.create_run(
        "de: high vs low", "de", {"groupby": "group", "group": "high", "reference": "low"}, parent_id=parent
    )
    symbols = [f"GENE{i:05d}" for i in range(n_genes)]
    for i, sym in enumerate(REFERENCE_GENES):
        symbols[i * 7 + 3] = sym
    in_ref = np.isin(symbols, REFERENCE_GENES)
    score = rng.normal(0, 2, n_genes) + 8 * in_ref
    pval = np.exp(-np.abs(score) * 3)
    table = pd.DataFrame(
        {
            "ensembl_id": [f"ENSG{i:011d}" for i in range(n_genes)],
            "symbol": symbols,
            "score": score,
            "logfoldchange": score / 4,
            "pval": pval,
            "pval_adj": np.minimum(1.0, pval * n_genes / 10),
        }
    )
    st.put_gene_table(rid, "de", table)
    st.finish_run(rid, "completed")  # no time passes: the pipeline's timings are the same with or without it
    return rid


def _data_run(st, parent: int, rng, clock: FrozenClock, n_cells: int) -> tuple[int, int]:
    import pandas as pd

    rid = st.create_run("data", "data", {"cells": n_cells, "synthetic": True}, parent_id=parent, device="cpu")
    dose = rng.choice([0.0, 1.25, 2.5, 12.5, 25.0], n_cells)
    klass = np.searchsorted([0.0, 1.25, 2.5, 12.5, 25.0], dose)
    group = np.where(dose >= 12.5, "high", "low")
    # genes per cell after truncation to the model's 256 input positions; higher doses detect fewer genes
    length = (210 - 2.5 * dose + rng.normal(0, 30, n_cells)).astype(int).clip(40, 256)
    split = rng.choice(["train", "validation", "test"], n_cells, p=[0.7, 0.15, 0.15])
    cells = pd.DataFrame(
        {
            "cell_id": [f"cell{i:05d}" for i in range(n_cells)],
            "dose": dose,
            "class": klass,
            "group": group,
            "length": length,
            "umap1": rng.normal(0, 1, n_cells) + klass * 0.8,
            "umap2": rng.normal(0, 1, n_cells) + (group == "high") * 2.0,
            "split": split,
        }
    )
    st.put_cells(rid, cells)
    st.put_labels(rid, "dose", DOSES)
    st.put_labels(rid, "lowhigh", LOWHIGH)
    st.put_split(rid, list(cells["cell_id"]), list(split))
    counts, edges = np.histogram(length, bins=20)
    median = int(np.median(length))
    st.put_vector(rid, "length_hist", counts.astype(float), meta={"edges": edges.tolist(), "median": median})
    st.put_json(
        rid,
        "qc_report",
        {
            "cells_in": n_cells + 37,
            "cells_kept": n_cells,
            "dropped": {"dose 0.25": 20, "dose 50": 17},
            "median_genes": median,
            "n_counts_source": "obs['n_counts']",
        },
    )
    clock.advance(30)
    st.finish_run(rid, "completed")
    return rid, median


PIPELINE_CONFIG = {
    "run": {"name": "demo", "seed": 0, "preset": "quick"},
    "data": {"path": "", "synth_scale": 0.09, "doses": [0.0, 1.25, 2.5, 12.5, 25.0]},
    "model": {"path": "", "max_len": 256},
    "train": {"epochs": 3, "modes": MODES, "lr": 5e-5},
    "compute": {"device": "cpu", "nproc": 1},
}

STAGES = ["data", "model", "tokenize", "finetune", "de", "attention", "summary"]

_LOST_SCRIPT = textwrap.dedent(
    """
    import sys, time
    time.time = lambda: {t!r}
    from store import Store
    st = Store(sys.argv[1])
    st.create_run("crashed-demo", "pipeline", {{"run": {{"preset": "default"}}}}, device="cpu")
    st.close()
    """
)


def build_fixture_store(
    path: str | Path, *, n_genes: int = 20_000, n_cells: int = 600, extra_runs: int = 0, with_de: bool = False
) -> FixtureIds:
    """`with_de`: also a DE child run (the TUI tests' store; the read-model tests add their own)."""
    from store import Store

    path = Path(path)
    ids = FixtureIds(path=path)
    rng = np.random.default_rng(7)
    with frozen_time(T0) as clock, Store(path) as st:
        for i in range(extra_runs):
            cfg = {"run": {"preset": ["default", "quick", "thesis-synthetic"][i % 3]}}
            rid = st.create_run(f"sweep-{i:03d}", "pipeline", cfg, device="cpu", tags=["sweep"] if i % 2 else ())
            child = st.create_run("dose/frozen", "finetune", {"task": "dose", "mode": "frozen"}, parent_id=rid)
            st.log_metric(child, "accuracy", 0.5 + 0.4 * ((i * 37) % 100) / 100, split="test")
            clock.advance(60)
            st.finish_run(child, "completed")
            st.finish_run(rid, "completed")
            ids.extra.append(rid)
            clock.advance(600)

        clock.t = T0
        ids.pipeline = st.create_run("demo", "pipeline", PIPELINE_CONFIG, device="cpu", tags=["baseline"])
        for stage in STAGES:
            st.set_stage(ids.pipeline, stage, "running")
            st.log_event(ids.pipeline, "started", stage=stage)
            clock.advance(20)
            st.set_stage(ids.pipeline, stage, "completed")
            st.log_event(ids.pipeline, "done in 20.0 s", stage=stage)
        ids.data, median = _data_run(st, ids.pipeline, rng, clock, n_cells)
        for task in ("dose", "lowhigh"):
            for mode in MODES:
                ids.finetunes[f"{task}/{mode}"] = _finetune(st, ids.pipeline, task, mode, rng, clock)
        if with_de:
            ids.de = _de_run(st, ids.pipeline, rng, clock, min(n_genes, 2_000))
        for task in ("dose", "lowhigh"):
            # the full-size key-gene table on the thesis's main comparison; a small one beside it
            genes = n_genes if task == "lowhigh" else min(n_genes, 2_000)
            ids.analyses[task] = _analysis(st, ids.pipeline, task, rng, clock, genes, median)
        st.set_progress(ids.pipeline, "summary", 1, 1, unit="stage")
        st.set_note(ids.pipeline, "fixture: the thesis design at toy scale")
        clock.advance(10)
        st.finish_run(ids.pipeline, "completed")

        clock.advance(3600)
        ids.failed = st.create_run(
            "bad-data",
            "pipeline",
            {"run": {"preset": "sciplex2-nutlin"}},
            data_path="/data/sciplex2.h5ad",
            device="cpu",
        )
        st.set_stage(ids.failed, "data", "running")
        st.log_event(ids.failed, "reading /data/sciplex2.h5ad", stage="data")
        st.log_event(ids.failed, "obs column 'dose_value' is missing", stage="data", level="error")
        clock.advance(12)
        st.finish_run(
            ids.failed,
            "failed",
            error=(
                "InputError: obs column 'dose_value' is missing in /data/sciplex2.h5ad\n"
                "columns present: perturbation, dose, cell_line, n_counts\n"
                'set data.dose_column in your --config file (e.g. dose_column = "dose")'
            ),
        )

        clock.advance(600)
        code = subprocess.run(
            [sys.executable, "-c", _LOST_SCRIPT.format(t=clock.t), str(path)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
        )
        if code.returncode != 0:
            raise RuntimeError(f"could not create the lost run: {code.stderr}")
        ids.lost = st.resolve_run("crashed-demo")

        clock.advance(600)
        ids.running = st.create_run("live", "pipeline", {"run": {"preset": "default"}}, device="cpu")
        for stage in ("data", "model", "tokenize"):
            st.set_stage(ids.running, stage, "completed")
        st.set_stage(ids.running, "finetune", "running")
        for stage in ("de", "attention", "summary"):
            st.set_stage(ids.running, stage, "pending")
        st.log_event(ids.running, "fine-tuning dose/frozen", stage="finetune")
        st.set_progress(ids.running, "finetune", 40, 120, unit="steps", throughput=2.5, eta_s=32.0)
    return ids


_TEMPLATES: dict[tuple, tuple[Path, FixtureIds]] = {}


def template_store(**kwargs) -> tuple[Path, FixtureIds]:
    """Build the store once per test process (per set of options) and reuse it as a template."""
    key = tuple(sorted(kwargs.items()))
    if key not in _TEMPLATES:
        folder = Path(tempfile.mkdtemp(prefix="gfattn-tui-fixture-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        ids = build_fixture_store(folder / "gfattn.db", **kwargs)
        _TEMPLATES[key] = (folder / "gfattn.db", ids)
    return _TEMPLATES[key]


def copy_store(dest_dir: Path, **kwargs) -> FixtureIds:
    """A private copy of the template store (tests may tag, note and delete in it)."""
    src, ids = template_store(**kwargs)
    dest = Path(dest_dir) / "gfattn.db"
    shutil.copyfile(src, dest)
    for suffix in ("-wal", "-shm"):
        extra = Path(str(src) + suffix)
        if extra.exists():
            shutil.copyfile(extra, Path(str(dest) + suffix))
    out = FixtureIds(**{**ids.__dict__, "path": dest})
    return out


@pytest.fixture
def tui_store(tmp_path) -> FixtureIds:
    return copy_store(tmp_path, with_de=True)


def frozen_clock() -> float:
    return NOW


def make_app(ids: FixtureIds, *, store_path: str | Path | None = None, **kwargs):
    """The app over a fixture store with a frozen clock, UTC timestamps and 50-row gene pages."""
    from gfattn_tui.app import GfattnApp
    from gfattn_tui.config import TuiConfig

    config = kwargs.pop("config", None) or TuiConfig(utc=True, page_size=50)
    return GfattnApp(store_path or ids.path, config=config, clock=frozen_clock, **kwargs)


async def settle(pilot, rounds: int = 3) -> None:
    """Let every worker finish and every posted message be handled."""
    from textual.worker import WorkerCancelled

    for _ in range(rounds):
        try:
            await pilot.app.workers.wait_for_complete()
        except WorkerCancelled:  # an exclusive worker replaced by a newer one: wait for that instead
            continue
        await pilot.pause()
