"""Run lifecycle around a block of code: heartbeat thread, SIGTERM/Ctrl-C handling, final status.

docs/architecture.md, "The store": a killed run never stays `running`. While the block runs, a daemon thread
refreshes the run's heartbeat; when the block ends the run is marked `completed`, `failed` (with the
exception's message) or `interrupted` (Ctrl-C, or SIGTERM turned into `RunInterrupted`). A `kill -9`
cannot be caught: then the heartbeat goes stale and readers report the run as `lost`.
"""

from __future__ import annotations

import signal
import threading
import traceback
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from store.errors import RunInterrupted, RunNotFoundError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from store.core import Store


def _beat(store: Store, run_id: int, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            store.heartbeat(run_id)
        except RunNotFoundError:
            return  # the run was deleted under us; nothing left to keep alive
        except StoreError:
            return  # the store was closed
        except Exception:
            continue  # a transient lock or I/O error: try again at the next beat


@contextmanager
def track(store: Store, run_id: int, *, heartbeat_s: float = 2.0) -> Iterator[int]:
    """See `Store.track`. Yields the run id."""
    store.heartbeat(run_id)
    stop = threading.Event()
    beater = threading.Thread(
        target=_beat,
        args=(store, run_id, max(float(heartbeat_s), 0.01), stop),
        name=f"gfattn-heartbeat-{run_id}",
        daemon=True,
    )
    beater.start()

    installed = False
    previous = None
    if threading.current_thread() is threading.main_thread():
        fired = []

        def on_sigterm(signum, frame):
            # raise once; a second SIGTERM while we record the outcome must not cut that short
            if not fired:
                fired.append(signum)
                raise RunInterrupted(signum)

        try:
            previous = signal.signal(signal.SIGTERM, on_sigterm)
            installed = True
        except (ValueError, OSError):  # no signals here (embedded interpreter)
            installed = False

    status, error = "completed", None
    try:
        yield run_id
    except RunInterrupted as exc:
        status, error = "interrupted", f"interrupted by signal {signal.Signals(exc.signum).name}"
        raise
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted by Ctrl-C (KeyboardInterrupt)"
        raise
    except SystemExit as exc:
        if exc.code not in (None, 0):
            status, error = "failed", f"exited with status {exc.code}"
        raise
    except GeneratorExit:
        status, error = "interrupted", "abandoned (generator closed)"
        raise
    except BaseException as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        status, error = "failed", f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        try:
            store.log_event(run_id, "".join(traceback.format_exception(exc)).rstrip(), level="error")
        except Exception:
            pass
        raise
    finally:
        stop.set()
        beater.join(timeout=max(5.0, 2 * float(heartbeat_s)))
        try:
            store.finish_run(run_id, status, error)
        finally:
            if installed:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
