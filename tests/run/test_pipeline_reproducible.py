"""Same seed, same numbers: a clean run, a run with warm caches analysed in two processes, and a run killed
mid fine-tuning, then failing on a full disk, then killed between its pairs, then resumed store identical
results; checkpoints belong to their store. Every run is the quick preset made smaller still, with two
pairs sharing a model (`PAIRS`), beside the session's quick run (its caches) unless its cache is cold on
purpose.

The session's quick run, the warm rerun and every run a fault stops are real `gfattn pipeline --quick`
subprocesses; faults are injected at named points through `GFATTN_FAULT` (`pipeline.compute.fault_point`):
SIGKILL at a fine-tuning step or a stage, ENOSPC while saving a model. The resume that completes the run, and
the clean run of two pairs, go through `pipeline.cli.main(argv)` in the test's process: the same numbers
from another process.
"""

import os
import shutil

import pytest

from store import Store

from tests._helpers_cli import cli, gfattn
from tests._helpers_repro import differences, stored_results
from tests._helpers_session import exclusive

pytestmark = pytest.mark.slow


def _gfattn_env(*args, env=None, cwd=None):
    import subprocess
    import sys

    full = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd, env=full, timeout=900
    )


SHARDED_RTOL = 1e-12  # sums over cells reduced across processes in another order (float64)


def _pipeline_id(db) -> int:
    (run,) = Store(db).list_runs(kind="pipeline")
    return run["id"]


def _same(db_a, db_b, *, rtol: float = 0.0):
    a, b = stored_results(db_a, _pipeline_id(db_a)), stored_results(db_b, _pipeline_id(db_b))
    diffs = differences(a, b, rtol=rtol)
    assert not diffs, "\n".join(diffs[:20])


# The quick preset, smaller still, with two pairs sharing a model (unfrozen: model b of one, model a of the
# other): every stage, each model's analysis (deletion of every model: gate "mark") and two pair analyses.
PAIRS = (
    "[data]\numap = false\n[train]\nepochs = 2\nmin_steps = 0\n"  # 2 epochs: 62 steps, not the preset's 150
    '[analysis]\ngate = "mark"\npairs = [["frozen", "unfrozen"], ["unfrozen", "last-1"]]\n'
    "max_cells = 60\nn_boot = 20\ndeletion_k = [5]\ndeletion_random_sets = 3\ndeletion_top_genes = 5\n"
    "ig_steps = 8\nig_max_steps = 16\n"  # integrated gradients' step doubling still decided, at fewer steps
)


def _pairs_config(folder) -> str:
    path = folder / "pairs.toml"
    if not path.exists():
        path.write_text(PAIRS)
    return str(path)


def _once(folder, name: str, run) -> None:
    """`run()` once per session, by whichever xdist worker comes first (the workers share `folder`)."""
    with exclusive(folder / f"{name}.lock"):
        done = folder / f"{name}.done"
        if done.exists():
            return
        assert not (folder / f"{name}.db").exists(), f"the {name} run failed in another worker of this session"
        run(folder / f"{name}.db")
        done.touch()


@pytest.fixture(scope="module")
def pairs_clean(quick_run):
    """The two pairs' run, uninterrupted, in one process (`pipeline.cli.main` in the test's process), in a
    store beside the session's quick run: its data, embedded model and tokenization cached there, and
    checkpoints of its own. The reference every other run of this module is compared with."""
    folder = quick_run[0].parent

    def run(db):
        out = cli("pipeline", "--quick", "--config", _pairs_config(folder), "--store", str(db), "--name", "pairs")
        assert out.returncode == 0, out.stderr[-3000:]
        assert "lowhigh: unfrozen: analysed once, used by 2 pairs" in out.stderr

    _once(folder, "pairs-clean", run)
    return folder / "pairs-clean.db"


@pytest.fixture(scope="module")
def warm_rerun(pairs_clean):
    """The same config again, in another store beside it: every cache is warm, and each model is analysed
    by two processes (torchrun, gloo) where the clean run used one."""
    folder = pairs_clean.parent

    def run(db):
        argv = ["pipeline", "--quick", "--config", _pairs_config(folder), "--analysis-nproc", "2"]
        out = gfattn(*argv, "--store", str(db), "--name", "pairs")
        assert out.returncode == 0, out.stderr[-3000:]
        assert "embedded model cached" in out.stderr and "tokenization cached" in out.stderr
        assert out.stderr.count("analysed in 2 processes (torchrun)") == 3  # frozen, unfrozen, last-1

    _once(folder, "pairs-sharded", run)
    return folder / "pairs-sharded.db"


def test_warm_caches_and_two_analysis_processes_give_identical_results(pairs_clean, warm_rerun):
    """Every stored result of the second run equals the first's: warm caches, and the analysis of each model
    (attention, attribution, deletion, cascade) sharded over two processes. Checkpoints (by hash), counts,
    rankings, gene sets and labels are identical; per-cell values and deletion logits are gathered, so they
    are the same numbers; sums over cells are all-reduced in float64 in another order, so floats agree to
    rounding: relative SHARDED_RTOL (docs/architecture.md, "Sharded analysis")."""
    _same(pairs_clean, warm_rerun, rtol=SHARDED_RTOL)
    (pipeline,) = Store(warm_rerun).list_runs(kind="pipeline")
    assert Store(warm_rerun).get_run(pipeline["id"])["config"]["compute"]["analysis_nproc"] == 2


def test_two_stores_in_one_folder_keep_their_own_checkpoints(pairs_clean, warm_rerun):
    paths = []
    for db in (pairs_clean, warm_rerun):
        st = Store(db)
        for child in st.children(_pipeline_id(db)):
            if child["kind"] == "finetune":
                ck = st.get_json(child["id"], "checkpoint")
                assert os.path.isdir(ck["path"]) and st.uid in ck["path"]
                paths.append(ck["path"])
    assert len(paths) == 6 and len(set(paths)) == 6  # both stores number their runs from 1


def test_killed_then_disk_full_then_killed_between_pairs_then_resumed_gives_identical_results(request, tmp_path):
    """The two pairs' run in a folder of its own (a cold cache: nothing shared), killed mid fine-tuning,
    failed on a full disk, refused a changed checkpoint, killed between its pairs and resumed, stores what
    the clean run stores. It needs nothing of the session's runs until it compares (it runs beside them, not
    after them: conftest.py)."""
    db = tmp_path / "gfattn.db"
    config = _pairs_config(tmp_path)
    # 1. SIGKILL in the middle of the unfrozen model's fine-tuning (a cold cache: nothing shared)
    out = _gfattn_env(
        "pipeline",
        "--quick",
        "--config",
        config,
        "--store",
        str(db),
        "--name",
        "pairs",
        env={"GFATTN_FAULT": "finetune-step:unfrozen:40"},
    )
    assert out.returncode == -9, (out.returncode, out.stderr[-2000:])
    st = Store(db)
    run_id = _pipeline_id(db)
    assert st.get_run(run_id)["status"] == "lost"
    st.close()

    # 2. resumed, the disk fills up while the last model is saved: one line, run failed, no temporaries
    out = _gfattn_env(
        "pipeline", "--resume", str(run_id), "--store", str(db), env={"GFATTN_FAULT": "save:lowhigh__last-1:enospc"}
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "made when the run started" in out.stderr  # a resumed run keeps its plan: no model timed again
    last = out.stderr.strip().splitlines()[-1]
    assert "out of disk space" in last and "lowhigh__last-1" in last and "--resume" in last, last
    assert "Traceback" not in out.stderr
    assert Store(db).get_run(run_id)["status"] == "failed"
    leftovers = [p for p in (tmp_path / ".gfattn-cache").rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers

    # 3. a checkpoint changed behind the store's back is refused, not reused
    st = Store(db)
    frozen = next(c for c in st.children(run_id) if c["name"] == "lowhigh/frozen")
    ck = st.get_json(frozen["id"], "checkpoint")
    st.close()
    weights = os.path.join(ck["path"], "model.safetensors")
    shutil.copyfile(weights, tmp_path / "weights.bak")
    with open(weights, "r+b") as fh:
        fh.seek(-8, os.SEEK_END)
        fh.write(b"\x00" * 8)
    out = cli("pipeline", "--resume", str(run_id), "--store", str(db))  # refused before any work: in this process
    assert out.returncode == 2, out.stderr[-2000:]
    assert "lowhigh__frozen" in out.stderr.strip().splitlines()[-1] and "sha256" in out.stderr
    shutil.copyfile(tmp_path / "weights.bak", weights)

    # 4. space freed, resumed: killed again between its two pairs (every model analysed, the first pair done)
    out = _gfattn_env(
        "pipeline",
        "--resume",
        str(run_id),
        "--store",
        str(db),
        env={"GFATTN_FAULT": "stage:attention lowhigh: unfrozen vs last-1"},
    )
    assert out.returncode == -9, (out.returncode, out.stderr[-2000:])
    assert "lowhigh/frozen: already fine-tuned (resumed), checkpoint verified" in out.stderr

    # 5. resumed once more (in this process): the second pair reads the shared model's stored analysis, and
    # every stored number equals the clean run's
    out = cli("pipeline", "--resume", str(run_id), "--store", str(db))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lowhigh: unfrozen: already analysed (resumed), used by 2 pairs" in out.stderr
    _same(request.getfixturevalue("pairs_clean"), db)


def test_each_model_analysed_once_and_both_pairs_read_its_results(pairs_clean):
    """Two pairs sharing a model: each model is analysed once per run and both pairs read its results (a run
    killed between the pairs resumes to the same numbers: the killed run's last resume above)."""
    clean = pairs_clean
    st = Store(clean)
    models = [c["name"] for c in st.children(_pipeline_id(clean)) if c["kind"] == "model"]
    assert models == ["lowhigh: frozen", "lowhigh: unfrozen", "lowhigh: last-1"]
    pairs = {c["name"]: c["id"] for c in st.children(_pipeline_id(clean)) if c["kind"] == "analysis"}
    first, second = pairs["lowhigh: frozen vs unfrozen"], pairs["lowhigh: unfrozen vs last-1"]
    assert st.get_json(first, "deletion_unfrozen") == st.get_json(second, "deletion_unfrozen")
    assert st.get_json(first, "sanity_unfrozen") == st.get_json(second, "sanity_unfrozen")
    a, b = st.gene_table_df(first, "genes"), st.gene_table_df(second, "genes")
    merged = a.merge(b, on="ensembl_id")
    for stem in ("attn", "key_score", "deletion_logit", "deletion_prob"):  # unfrozen is b, then a
        assert merged[f"{stem}_b_x"].fillna(-1e300).tolist() == merged[f"{stem}_a_y"].fillna(-1e300).tolist(), stem
    st.close()
