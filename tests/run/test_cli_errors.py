"""Store problems and closed pipes at the top of `gfattn`: one line on stderr and exit 2 (or a quiet exit
when stdout's reader went away), never a traceback, and nothing created on the way.

`gfattn pipeline --quick` opens the store before any heavy work, so its bad-store cases are cheap.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from store import SCHEMA_VERSION, Store

from tests import REPO
from tests._helpers_cli import cli
from tests.store.test_store_readonly import ReadOnlyFolder, _env


def gfattn(*args, timeout=300) -> subprocess.CompletedProcess:
    """The command in this process (`pipeline.cli.main`): these errors come before any work."""
    return cli(*args, cwd=REPO)


def gfattn_process(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def assert_one_line(out: subprocess.CompletedProcess, command: str, text: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout[-500:], out.stderr[-3000:])
    assert out.stderr.startswith(f"gfattn {command}: error: ") and out.stderr.count("\n") == 1, out.stderr[-3000:]
    assert text in out.stderr and "Traceback" not in out.stderr, out.stderr


def _newer_store(path: Path) -> None:
    Store(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()


# ------------------------------------------------------------------------------ gfattn pipeline
def test_pipeline_on_a_file_that_is_not_sqlite(tmp_path):
    junk = tmp_path / "notes.db"
    junk.write_bytes(b"these are my notes, not a database\n" * 200)
    assert_one_line(gfattn("pipeline", "--quick", "--store", junk), "pipeline", "is not a usable gfattn store")
    assert junk.read_bytes() == b"these are my notes, not a database\n" * 200


def test_pipeline_on_a_store_of_a_newer_gfattn(tmp_path):
    path = tmp_path / "new.db"
    _newer_store(path)
    assert_one_line(gfattn("pipeline", "--quick", "--store", path), "pipeline", "newer gfattn")
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    raw.close()


def test_pipeline_on_a_store_in_a_readonly_folder(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    Store(shared / "gfattn.db").close()
    with ReadOnlyFolder(shared) as ro:
        out = ro.gfattn("pipeline", "--quick", "--store", shared / "gfattn.db")
        assert_one_line(out, "pipeline", f"store {shared / 'gfattn.db'} cannot be written: ")
        out = ro.gfattn("pipeline", "--quick", "--store", shared / "fresh.db")
        assert_one_line(out, "pipeline", f"cannot create store {shared / 'fresh.db'}: ")
    assert sorted(p.name for p in shared.iterdir()) == ["gfattn.db"]


def test_pipeline_with_a_mistyped_store_folder_creates_nothing(tmp_path):
    store = tmp_path / "resluts" / "gfattn.db"
    out = gfattn("pipeline", "--quick", "--store", store)
    assert_one_line(
        out, "pipeline", f"folder {tmp_path / 'resluts'} of store {store} does not exist; create it or fix --store"
    )
    assert not (tmp_path / "resluts").exists()


# ------------------------------------------------------------------------------ every command
def test_a_directory_as_store_is_one_line_for_every_command(tmp_path, capsys):
    from pipeline.cli import main

    Store(tmp_path / "gfattn.db").close()
    commands = [
        ["runs"],
        ["show", "1"],
        ["export", "1", "--out", str(tmp_path / "x")],
        ["plot", "1", "--out", str(tmp_path / "f")],
        ["tag", "1", "t"],
        ["note", "1", "n"],
        ["rm", "1", "--yes"],
    ]
    for argv in commands:
        assert main([*argv, "--store", str(tmp_path)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"gfattn {argv[0]}: error: store path {tmp_path} is a directory") and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "f").exists()
    assert_one_line(gfattn("pipeline", "--quick", "--store", tmp_path), "pipeline", "is a directory")


def test_mistyped_folder_for_reading_commands_and_the_tui(tmp_path, capsys):
    from gfattn_tui.app import main as tui_main

    store = tmp_path / "typo" / "gfattn.db"
    out = gfattn("runs", "--store", store)
    assert_one_line(out, "runs", f"folder {tmp_path / 'typo'} of store {store} does not exist")
    assert tui_main(["--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gfattn-tui: error: folder ") and "create it or fix --store" in err and err.count("\n") == 1
    assert not (tmp_path / "typo").exists()


def test_plot_on_a_store_of_a_newer_gfattn(tmp_path):
    path = tmp_path / "new.db"
    _newer_store(path)
    assert_one_line(gfattn("plot", "1", "--out", tmp_path / "fig", "--store", path), "plot", "newer gfattn")
    assert_one_line(
        gfattn("plot", "1", "--out", tmp_path / "fig", "--store", tmp_path / "none.db"), "plot", "no gfattn store at"
    )
    assert not (tmp_path / "none.db").exists()


# ------------------------------------------------------------------------------ closed pipes
@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """Enough output to overflow any pipe buffer: 1500 runs, and a run whose show document is ~1 MB."""
    path = tmp_path_factory.mktemp("pipe") / "gfattn.db"
    with Store(path) as st:
        with st._write():
            for i in range(1500):
                st.create_run(f"run-{i:04d}", "finetune", {"i": i}, tags=["bulk"])
        st.put_json(1, "big", {"values": list(range(150_000))})
    return path


@pytest.mark.parametrize("args", [("runs", "--json"), ("show", "1", "--json"), ("runs",)])
def test_output_into_a_pipe_closed_early_exits_quietly(big_store, args):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, "--store", str(big_store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=REPO,
    )
    first = proc.stdout.readline()  # like `| head -1`: read one line, then go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert first.strip()
    assert err == "" and code == 141, (code, err[-3000:])


def test_a_full_read_still_gets_everything(big_store):
    out = gfattn("runs", "--json", "--store", big_store)
    assert out.returncode == 0 and len(json.loads(out.stdout)) == 1500


def test_broken_pipe_elsewhere_is_not_swallowed(monkeypatch, tmp_path):
    """Only a closed stdout ends quietly: a BrokenPipeError from another pipe is a real failure."""
    import pipeline.commands.runs as runs_cmd
    from pipeline.cli import main

    Store(tmp_path / "s.db").close()

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe (a worker's pipe)")

    monkeypatch.setattr(runs_cmd, "run", broken)
    with pytest.raises(BrokenPipeError):
        main(["runs", "--store", str(tmp_path / "s.db")])
