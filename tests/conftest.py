"""Shared test set-up: quiet, deterministic, offline, and small thread counts on 2-core machines."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/gfattn-numba-cache")
# tests run tiny models on 2 cores, where one thread per process avoids thread-pool contention
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from pipeline.paths import shared_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared():
    """The shared reference folder; skips the test where it is not configured."""
    path = shared_dir()
    if path is None:
        pytest.skip("GFATTN_SHARED is not set to the shared reference folder (real Geneformer dictionaries)")
    return path


@pytest.fixture(scope="session")
def geneformer_dir(shared):
    path = shared / "geneformer"
    if not (path / "token_dictionary_gc104M.pkl").exists():
        pytest.skip(f"no Geneformer dictionaries under {path}")
    return path


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One `gfattn pipeline --quick` per test session, shared by every test that reads a complete run
    (the end-to-end checks, reproducibility, checkpoint ownership): (store path, CompletedProcess)."""
    from tests._helpers_cli import gfattn

    root = tmp_path_factory.mktemp("quick")
    db = root / "gfattn.db"
    out = gfattn("pipeline", "--quick", "--store", str(db), "--name", "e2e")
    assert out.returncode == 0, out.stderr[-3000:]
    return db, out
