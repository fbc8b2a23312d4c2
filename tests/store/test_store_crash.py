"""Live reading and crash safety of the store with a real writing process (docs/architecture.md, "The store").

Writers are forked from one helper process that has imported `store` once, so twenty kill trials cost
twenty forks rather than twenty interpreter start-ups. Each writer loops forever writing batches:
BATCH metric rows named `b<k>`, a whole gene table whose rows all carry `batch = k`, and a vector.
A batch is whole when every row of it is visible or none is.
"""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from store import Store, StoreError

from tests import REPO

BATCH = 25
GENES = 200

ZYGOTE = r"""
import os, sys, time, traceback
from store import Store, RunInterrupted

BATCH, GENES = {batch}, {genes}

def write(path, seed, pace):
    st = Store(path)
    run = st.create_run(f"writer-{{seed}}", "test")
    sys.stdout.write(f"ready {{os.getpid()}} {{run}}\n")
    sys.stdout.flush()
    try:
        with st.track(run, heartbeat_s=0.05):
            k = 0
            while True:
                st.log_metrics(run, [dict(name=f"b{{k}}", value=float(i), step=k) for i in range(BATCH)])
                st.put_gene_table(run, "genes", [
                    dict(ensembl_id=f"ENSG{{i:011d}}", symbol=f"G{{i}}", batch=k, score=float((i * 7919 + k) % GENES))
                    for i in range(GENES)])
                st.put_vector(run, "v", [float(k)] * 64)
                k += 1
                if pace:
                    time.sleep(pace)
    except RunInterrupted:
        os._exit(143)

while True:
    line = sys.stdin.readline()
    if not line:
        break
    cmd = line.split()
    if cmd[0] == "go":
        pid = os.fork()
        if pid == 0:
            try:
                write(cmd[1], int(cmd[2]), float(cmd[3]))
            except BaseException:
                traceback.print_exc()
            os._exit(1)
    elif cmd[0] == "reap":
        _, status = os.waitpid(int(cmd[1]), 0)
        print(f"reaped {{cmd[1]}} {{status}}", flush=True)
    elif cmd[0] == "quit":
        break
"""


class Zygote:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE.format(batch=BATCH, genes=GENES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _read(self, prefix: str) -> list[str]:
        line = self.proc.stdout.readline()
        assert line.startswith(prefix), f"helper said {line!r} (expected {prefix})"
        return line.split()

    def start_writer(self, path, seed: int, pace: float = 0.0) -> tuple[int, int]:
        self._send(f"go {path} {seed} {pace}")
        _, pid, run = self._read("ready")
        return int(pid), int(run)

    def reap(self, pid: int) -> int:
        self._send(f"reap {pid}")
        return int(self._read("reaped")[2])

    def close(self):
        try:
            self._send("quit")
            self.proc.wait(timeout=10)
        except Exception:  # pragma: no cover
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def check_whole(st: Store, run: int) -> dict:
    """Assert every batch visible to `st` is whole; return what was seen."""
    counts = {m["name"]: m["count"] for m in st.metric_names(run)}
    batches = sorted(int(n[1:]) for n in counts)
    assert batches == list(range(len(batches))), f"a batch is missing: {batches[-5:]}"
    assert all(c == BATCH for c in counts.values()), f"partial metric batch: {counts}"
    genes = st.gene_table(run, "genes", limit=None) if "genes" in st.gene_tables(run) else []
    assert len(genes) in (0, GENES), f"partial gene table: {len(genes)} rows"
    gene_batches = {g["batch"] for g in genes}
    assert len(gene_batches) <= 1, f"gene table mixes batches {sorted(gene_batches)}"
    top = st.gene_table(run, "genes", order_by="score", limit=20) if genes else []
    assert len({g["batch"] for g in top}) <= 1
    if "v" in st.vector_names(run):
        v = st.vector(run, "v")
        assert v.shape == (64,) and len(set(v.tolist())) == 1
    return {"metric_batches": len(batches), "gene_batch": next(iter(gene_batches), None)}


def test_reader_polls_while_a_process_writes(tmp_path, zygote):
    path = tmp_path / "live.db"
    Store(path).close()
    pid, run = zygote.start_writer(path, seed=1, pace=0.005)
    polls, locked, states, versions = 1000, 0, set(), set()
    try:
        with Store(path) as st:
            for _ in range(polls):
                try:
                    seen = check_whole(st, run)
                    states.add((seen["metric_batches"], seen["gene_batch"]))
                    versions.add(st.data_version())
                    assert st.list_runs()[0]["id"] == run
                except sqlite3.OperationalError as exc:
                    if "locked" in str(exc) or "busy" in str(exc):
                        locked += 1
                    else:
                        raise
    finally:
        os.kill(pid, signal.SIGTERM)
        status = zygote.reap(pid)
    print(
        f"\n[store live read] polls={polls} lock_errors={locked} distinct_states_seen={len(states)} "
        f"data_versions_seen={len(versions)}"
    )
    assert locked == 0
    assert len(states) > 10, "the writer barely wrote while the reader polled"
    # SIGTERM in the writing process: the run reads as interrupted and the process exits cleanly
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 143
    with Store(path) as st:
        run_row = st.get_run(run)
        assert run_row["status"] == "interrupted" and "SIGTERM" in run_row["error"]
        check_whole(st, run)


def test_kill_9_mid_write_leaves_whole_batches_and_a_lost_run(tmp_path, zygote):
    path = tmp_path / "crash.db"
    Store(path).close()
    rng = random.Random(20240501)
    trials, written = 20, []
    for trial in range(trials):
        pid, run = zygote.start_writer(path, seed=100 + trial)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        status = zygote.reap(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        with Store(path, stale_after_s=0.0) as st:
            assert st._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert st._conn.execute("PRAGMA foreign_key_check").fetchall() == []
            seen = check_whole(st, run)
            written.append(seen["metric_batches"])
            assert st.get_run(run)["status"] == "lost"
            assert run in st.reap_lost()
    with Store(path) as st:  # the store keeps working after all that
        assert len(st.list_runs(status="lost")) == trials
        r = st.create_run("after", "test")
        st.log_metric(r, "ok", 1.0)
    print(
        f"\n[store kill -9] trials={trials} integrity_ok={trials} partial_batches=0 lost={trials} "
        f"batches_written_per_trial min={min(written)} median={sorted(written)[trials // 2]} max={max(written)}"
    )


def test_writer_store_refuses_a_closed_handle(tmp_path):
    st = Store(tmp_path / "s.db")
    st.close()
    with pytest.raises(StoreError, match="closed"):
        st.list_runs()


def test_a_run_killed_on_this_host_reads_lost_at_once(tmp_path):
    """The pid (and its start time) is recorded, so no heartbeat timeout is needed on the same host."""
    path = tmp_path / "s.db"
    Store(path).close()
    code = (
        "import sys, time\nfrom store import Store\nst = Store(sys.argv[1])\n"
        "print(st.create_run('doomed', 'test'), flush=True)\ntime.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        run = int(proc.stdout.readline())
        with Store(path, stale_after_s=3600) as st:
            assert st.get_run(run)["status"] == "running"
    finally:
        proc.kill()
        proc.wait()
    with Store(path, stale_after_s=3600) as st:  # heartbeat seconds old, far within the threshold
        assert st.get_run(run)["status"] == "lost"
        assert [r["id"] for r in st.list_runs(status="lost")] == [run]
        assert st.reap_lost() == [run]
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "runs", "--json", "--store", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0 and json.loads(out.stdout)[0]["status"] == "lost", out.stderr
