"""pipeline.io: atomic files and folders, concurrent cache writers, manifests, a full disk."""

import errno
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from pipeline.errors import InputError
from pipeline.io import (
    DiskFullError,
    atomic_write_text,
    remove_stale_temporaries,
    staging_dir,
    verify_manifest,
    write_manifest,
)


def _publish(out, tag, barrier):
    barrier.wait()
    with staging_dir(out, replace=False) as tmp:
        for i in range(50):
            (tmp / f"part{i}.txt").write_text(tag * 1000)
        time.sleep(0.05)


def test_two_writers_of_one_cache_entry_both_complete(tmp_path):
    out = tmp_path / "cache" / "entry"
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_publish, args=(out, t, barrier)) for t in "abcd"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]  # no writer failed (the old rename raced: ENOTEMPTY)
    tags = {p.read_text()[0] for p in out.iterdir()}
    assert len(tags) == 1 and len(list(out.iterdir())) == 50  # one complete copy, never a mixture
    assert [p.name for p in out.parent.iterdir()] == ["entry"]  # no temporaries left


def test_a_failed_writer_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "deeper" / "entry"
    with pytest.raises(RuntimeError):
        with staging_dir(out) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()  # the parents it made are gone too


def test_disk_full_is_one_clear_error_naming_the_path(tmp_path):
    out = tmp_path / "entry"
    with pytest.raises(DiskFullError) as info:
        with staging_dir(out):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(out) in str(info.value) and "out of disk space" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_file_size_limit_is_a_disk_full_error(tmp_path):
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from pipeline.io import atomic_write_text, DiskFullError\n"
        "try:\n"
        f"    atomic_write_text({str(tmp_path / 'big.txt')!r}, 'x' * 100000)\n"
        "except DiskFullError as exc:\n"
        "    print(exc); sys.exit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 3, out.stderr
    assert "big.txt" in out.stdout and "out of disk space" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    (tmp_path / f".entry.{dead.pid}.abc123.tmp").mkdir()
    (tmp_path / f".file.h5ad.{dead.pid}.xyz.tmp.h5ad").write_text("half")
    live = tmp_path / f".entry.{os.getpid()}.def456.tmp"
    live.mkdir()
    assert remove_stale_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [live.name]


def test_manifest_catches_a_changed_cache_file(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    atomic_write_text(d / "weights.bin", "0123456789")
    write_manifest(d)
    verify_manifest(d)
    (d / "weights.bin").write_text("0123456780")
    with pytest.raises(InputError, match="does not match its manifest"):
        verify_manifest(d, what="cached embedded model")


def test_pipeline_on_a_full_disk_fails_cleanly_and_records_it(tmp_path):
    """The synthetic data do not fit under a 1 MB file-size limit: one line, the run failed, no temporaries,
    no crash in h5py (which the old code hit with exit 139)."""
    db = tmp_path / "gfattn.db"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "pipeline", "--quick", "--store", str(db)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=600,
    )
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    last = out.stderr.strip().splitlines()[-1]
    assert "out of disk space" in last and "sciplex-like" in last and "--resume" in last, last
    assert "Traceback" not in out.stderr
    from store import Store

    (run,) = Store(db).list_runs(kind="pipeline")
    assert run["status"] == "failed"
    assert not [p for p in (tmp_path / ".gfattn-cache").rglob("*") if ".tmp" in p.name]
