"""Shared test set-up: quiet, deterministic, offline, and small thread counts on 2-core machines."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/gfattn-numba-cache")
# tests run tiny models on 2 cores, where one thread per process avoids thread-pool contention
os.environ.setdefault("OMP_NUM_THREADS", "1")
# an OpenMP thread that waits for work sleeps rather than spins: a test that uses two threads shares the cores
# with the other xdist worker, whose CPU the spinning would take
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the TUI's tests check what is shown, not how it moves there: no scrolling animations to wait for
os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")

import pytest  # noqa: E402

from pipeline.paths import shared_dir  # noqa: E402

from tests._helpers_session import session_folder, start_once, wait_for  # noqa: E402


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


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    """A test that reads the session's quick run is an end-to-end test: marked `slow`, so that the edit loop's
    tier (`make test-fast`, `-m "not slow"`) never starts the run. Those tests run after the others (a stable
    sort, the same order in every xdist worker): the run, started with the session, is done by the time they
    ask for it, and no worker sits waiting for it while other tests could run."""
    for item in items:
        if _reads_quick_run(item):
            item.add_marker(pytest.mark.slow)
    items[:] = sorted(items, key=_reads_quick_run)


def _reads_quick_run(item) -> bool:
    return "quick_run" in getattr(item, "fixturenames", ())


def _quick_run_folder(tmp_path_factory) -> Path:
    return session_folder(tmp_path_factory) / "quick"


def _quick_run_argv(folder: Path) -> list[str]:
    store = str(folder / "gfattn.db")
    return [sys.executable, "-m", "pipeline", "pipeline", "--quick", "--store", store, "--name", "e2e"]


@pytest.fixture(scope="session", autouse=True)
def _quick_run_started(request, tmp_path_factory):
    """Where a selected test reads the session's quick run, the run starts with the session, in the
    background: it runs beside the other tests instead of holding up the first test that reads it."""
    thread = None
    if any("quick_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        folder = _quick_run_folder(tmp_path_factory)
        thread = start_once(folder, _quick_run_argv(folder))
    yield
    if thread is not None:
        thread.join()  # another worker may still wait for it


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One `gfattn pipeline --quick` per test session, one for all xdist workers (`_quick_run_started`), shared
    by every test that reads a complete run (the end-to-end checks, reproducibility, checkpoint ownership,
    key genes): (store path, CompletedProcess). Tests read it; one that writes beside it holds a lock
    (`_helpers_session.exclusive`), as the warm rerun does."""
    folder = _quick_run_folder(tmp_path_factory)
    argv = _quick_run_argv(folder)
    start_once(folder, argv)  # already started, unless no test collected at the start asked for it
    out = wait_for(folder, argv, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return folder / "gfattn.db", out


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_restored():
    """Each test module leaves torch's thread count as it found it (one: OMP_NUM_THREADS above). A module that
    raises it for its tests, or a library that resets the OpenMP pool, would otherwise leave two threads
    to every later test of the same worker, contending with the other worker for the two cores."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else int(os.environ["OMP_NUM_THREADS"])
    yield
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
