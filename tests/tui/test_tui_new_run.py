"""The New run form on the user's own data: the obs read in a worker, a label column and its classes
picked in the values table, groups written into a generated config, a filter, the class sizes shown
(checked against counts made independently with pandas), problems that block Start, and the path
completion of the data field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomllib

from gfattn_tui.launcher import RunRequest
from gfattn_tui.run_design import Design, class_sizes, parse_assignments, suggest_path
from gfattn_tui.screens.new_run import NewRunScreen

from tests._helpers_tui import make_app, settle

SIZE = (120, 60)
PERTURBATIONS = {"control": 30, "ZAP70_1": 12, "LCK_1": 9, "CD3E_2": 7, "rare": 2}


class EmptyStore:
    def __init__(self, path: Path):
        self.path = path


@pytest.fixture
def cells(tmp_path) -> Path:
    """60 cells: `perturbation` (five guides), `stim` (ctrl / IFNB, not balanced) and a numeric `dose`."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    perturbation = np.repeat(list(PERTURBATIONS), list(PERTURBATIONS.values()))
    rng.shuffle(perturbation)
    n = len(perturbation)
    stim = np.where(rng.random(n) < 0.4, "IFNB", "ctrl")
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(perturbation),
            "stim": stim,
            "dose": rng.choice([0.0, 2.5, 25.0], size=n),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(8)])  # Ensembl IDs: the embedded model's genes
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.0, size=(n, 8)).astype(np.float32)), obs=obs, var=var)
    path = tmp_path / "data" / "cells.h5ad"
    path.parent.mkdir()
    adata.write_h5ad(path)
    return path


def _obs(path: Path) -> pd.DataFrame:
    import anndata as ad

    return ad.read_h5ad(path).obs


async def _open_form(app, pilot) -> NewRunScreen:
    await settle(pilot)
    await pilot.press("N")
    await settle(pilot)
    assert isinstance(app.screen, NewRunScreen)
    return app.screen


async def _load(form, pilot, path: Path) -> None:
    form.query_one("#nr-data").value = str(path)
    await settle(pilot)
    assert form.obs is not None, str(form.query_one("#nr-obs").content)


async def _choose_column(form, pilot, column: str) -> None:
    form.query_one("#nr-label-column").value = column
    await settle(pilot)


async def _pick(form, pilot, *values: str) -> None:
    """Move the values table's cursor to each value and press space."""
    table = form.query_one("#nr-values")
    table.focus()
    keys = [str(k.value) for k in table.rows]
    for value in values:
        table.move_cursor(row=keys.index(value))
        await pilot.press("space")
    await settle(pilot)


def _text(form, selector: str) -> str:
    return str(form.query_one(selector).content)


@pytest.mark.asyncio
async def test_classes_picked_in_order_give_the_sizes_and_the_command(tmp_path, cells):
    expected = _obs(cells)["stim"].value_counts()
    app = make_app(EmptyStore(tmp_path / "gfattn.db"), poll=False)
    async with app.run_test(size=SIZE) as pilot:
        form = await _open_form(app, pilot)
        await _load(form, pilot, cells)
        assert "60 cells, 3 obs columns" in _text(form, "#nr-obs")
        labels = {str(label): value for label, value in form.query_one("#nr-label-column")._options}
        assert labels["perturbation (5 values)"] == "perturbation"
        assert labels["stim (2 values)"] == "stim"

        await _choose_column(form, pilot, "stim")
        table = form.query_one("#nr-values")
        shown = {str(k.value): str(table.get_row(k)[2]) for k in table.rows}
        assert shown == {v: f"{n:,}" for v, n in expected.items()}

        await _pick(form, pilot, "ctrl", "IFNB")  # ctrl first: the picked order is the class order
        assert form.picked == ["ctrl", "IFNB"]
        assert {str(k.value): str(table.get_row(k)[0]) for k in table.rows} == {"ctrl": "1", "IFNB": "2"}
        assert form.sizes.classes == {"ctrl": int(expected["ctrl"]), "IFNB": int(expected["IFNB"])}
        assert f"ctrl {expected['ctrl']} · IFNB {expected['IFNB']}" in _text(form, "#nr-sizes")
        assert "--label-column stim --classes ctrl,IFNB" in _text(form, "#nr-command")
        assert _text(form, "#nr-design-problems") == ""

        await _pick(form, pilot, "ctrl")  # picking again drops it
        assert form.picked == ["IFNB"]
        assert "pick at least two classes" in _text(form, "#nr-design-problems")


@pytest.mark.asyncio
async def test_filter_counts_match_pandas_and_a_filter_keeping_nothing_blocks_start(tmp_path, cells):
    obs = _obs(cells)
    kept = obs[obs["stim"] == "IFNB"]["perturbation"].value_counts()
    app = make_app(EmptyStore(tmp_path / "gfattn.db"), poll=False)
    launched = []
    app.launch_run = lambda request, **_: launched.append(request)
    async with app.run_test(size=SIZE) as pilot:
        form = await _open_form(app, pilot)
        await _load(form, pilot, cells)
        await _choose_column(form, pilot, "perturbation")
        await _pick(form, pilot, "control", "ZAP70_1")
        form.query_one("#nr-filter").value = "stim=IFNB"
        await settle(pilot)
        assert form.sizes.classes == {"control": int(kept["control"]), "ZAP70_1": int(kept["ZAP70_1"])}
        assert form.sizes.cells == int(kept["control"] + kept["ZAP70_1"])
        assert "--filter stim=IFNB" in _text(form, "#nr-command")

        form.query_one("#nr-filter").value = "stim=IFNB; perturbation=nothing*"
        await settle(pilot)
        problems = _text(form, "#nr-design-problems").splitlines()
        assert problems == ["filter perturbation=nothing* keeps no cell"]
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert app.screen is form and launched == []
        assert "filter perturbation=nothing* keeps no cell" in _text(form, "#nr-problems")


@pytest.mark.asyncio
async def test_groups_are_written_as_a_task_of_a_generated_config(tmp_path, cells):
    obs = _obs(cells)
    counts = obs["perturbation"].value_counts()
    app = make_app(EmptyStore(tmp_path / "gfattn.db"), poll=False)
    started: list[RunRequest] = []
    app.launch_run = lambda request, **_: started.append(request) or _Launched()
    async with app.run_test(size=SIZE) as pilot:
        form = await _open_form(app, pilot)
        await _load(form, pilot, cells)
        await _choose_column(form, pilot, "perturbation")
        form.query_one("#nr-groups").value = "KO=ZAP70_1, LCK_1; ctrl=control"
        await settle(pilot)
        assert form.sizes.classes == {"KO": int(counts["ZAP70_1"] + counts["LCK_1"]), "ctrl": int(counts["control"])}
        request = form.request()
        config = Path(request.config)
        assert config.parent == tmp_path / ".gfattn-cache" / "forms" and config.suffix == ".toml"
        assert f"--config {config}" in _text(form, "#nr-command")
        assert "--label-column" not in _text(form, "#nr-command")  # flags would replace the config's task
        doc = tomllib.loads(request.config_text)
        assert doc["tasks"] == [
            {
                "name": "perturbation",
                "column": "perturbation",
                "groups": {"KO": ["ZAP70_1", "LCK_1"], "ctrl": ["control"]},
            }
        ]

        form.query_one("#nr-groups").value = "KO=ZAP70_1,LCK_9; ctrl=control"
        await settle(pilot)
        assert _text(form, "#nr-design-problems").splitlines() == ["group KO: 'LCK_9' does not occur in perturbation"]

        form.query_one("#nr-groups").value = "KO=ZAP70_1; few=rare"
        await settle(pilot)
        assert "class few has 2 cells; the split needs at least 14" in _text(form, "#nr-design-problems")

        form.query_one("#nr-groups").value = "KO=ZAP70_1,CD3E_2; ctrl=control"
        await settle(pilot)
        await pilot.press("ctrl+s")
        await settle(pilot)
    assert len(started) == 1


class _Launched:
    pid = 0


def test_start_writes_the_generated_config(tmp_path, monkeypatch):
    """The launcher writes the form's config where the command line says, before the run starts."""
    import gfattn_tui.launcher as launcher

    seen = {}
    monkeypatch.setattr(launcher, "_start", lambda argv, store, **kw: seen.setdefault("argv", argv))
    config = tmp_path / ".gfattn-cache" / "forms" / "x.toml"
    request = RunRequest(config=str(config), config_text='[[tasks]]\nname = "a"\n')
    assert request.validate() == []
    launcher.start_pipeline(request, tmp_path / "gfattn.db")
    assert config.read_text() == request.config_text
    assert seen["argv"][seen["argv"].index("--config") + 1] == str(config)


def test_class_sizes_are_the_pipelines_on_every_row(cells):
    """The distinct-row shortcut gives the counts of `pipeline.data.design.select_cells` on the full obs."""
    from pipeline.data.design import select_cells

    obs = _obs(cells)
    design = Design(column="dose", groups={"low": ["0", "2.5"], "high": ["25"]}, filters={"stim": ["ctrl"]})
    sizes = class_sizes(obs, design)
    cfg = {"tasks": [design.task()], "data": {"filter": design.filters, "max_cells": 0}, "run": {"seed": 0}}
    sel = select_cells(obs, cfg)
    assert sizes.classes == sel.counts_after
    assert sizes.cells == len(sel.index)
    ctrl = obs[obs["stim"] == "ctrl"]["dose"]
    assert sizes.classes == {"low": int(ctrl.isin([0.0, 2.5]).sum()), "high": int((ctrl == 25.0).sum())}


def test_assignments_parse_and_report_bad_items():
    assert parse_assignments("KO=a, b; ctrl=c", "groups") == ({"KO": ["a", "b"], "ctrl": ["c"]}, [])
    parsed, problems = parse_assignments("stim=x; =y; z", "filter")
    assert parsed == {"stim": ["x"]}
    assert len(problems) == 2 and all(p.startswith("filter ") for p in problems)


def test_path_suggestions_complete_folders_and_data_files(tmp_path, cells):
    (tmp_path / "data" / "notes.txt").write_text("")
    (tmp_path / "data" / "cells.loom").write_bytes(b"")
    (tmp_path / "data" / "other.h5ad").write_bytes(b"")
    assert suggest_path(str(tmp_path / "da")) == str(tmp_path / "data") + "/"
    assert suggest_path(str(tmp_path / "data" / "o")) == str(tmp_path / "data" / "other.h5ad")
    assert suggest_path(str(tmp_path / "data" / "c")) == str(tmp_path / "data" / "cells.")  # .h5ad and .loom
    assert suggest_path(str(tmp_path / "data" / "n")) is None  # not a data file
    assert suggest_path(str(tmp_path / "data"), dirs_only=True) == str(tmp_path / "data") + "/"


@pytest.mark.asyncio
async def test_tab_accepts_the_path_completion(tmp_path, cells):
    app = make_app(EmptyStore(tmp_path / "gfattn.db"), poll=False)
    async with app.run_test(size=SIZE) as pilot:
        form = await _open_form(app, pilot)
        field = form.query_one("#nr-data")
        field.focus()
        field.value = str(cells.parent / "ce")
        field.cursor_position = len(field.value)
        await settle(pilot)
        await pilot.press("tab")
        await settle(pilot)
        assert field.value == str(cells)
        assert form.obs is not None  # the completed path was read


def test_loom_obs_is_read_from_its_column_attributes(tmp_path, cells):
    """A .loom's column attributes (fixed-length byte strings, as loompy writes them) give the obs of the
    cells, with the CellID attribute as index."""
    import h5py

    from pipeline.commands.inspect import obs_columns, read_obs_table

    original = _obs(cells)
    loom = tmp_path / "cells.loom"
    with h5py.File(loom, "w") as fh:
        fh["matrix"] = np.zeros((8, len(original)), dtype=np.float32)
        fh["row_attrs/Gene"] = np.array([f"G{i}".encode() for i in range(8)])
        fh["col_attrs/CellID"] = original.index.to_numpy().astype("S")
        fh["col_attrs/perturbation"] = original["perturbation"].astype(str).to_numpy().astype("S")
        fh["col_attrs/stim"] = original["stim"].to_numpy().astype("S")
        fh["col_attrs/dose"] = original["dose"].to_numpy()
    direct = read_obs_table(loom)
    assert list(direct.index) == list(original.index)
    by_name = sorted(obs_columns(direct), key=lambda c: c["name"])
    assert by_name == sorted(obs_columns(original), key=lambda c: c["name"])


@pytest.mark.asyncio
async def test_an_unreadable_data_file_is_a_problem(tmp_path):
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(b"not hdf5")
    app = make_app(EmptyStore(tmp_path / "gfattn.db"), poll=False)
    async with app.run_test(size=SIZE) as pilot:
        form = await _open_form(app, pilot)
        form.query_one("#nr-data").value = str(broken)
        await settle(pilot)
        assert form.obs is None
        assert f"cannot read the obs of {broken}" in _text(form, "#nr-design-problems")
        assert not form.query_one("#nr-label-column")._options[1:]  # only the blank prompt


def test_request_accepts_loom_and_a_tokenized_folder(tmp_path):
    loom = tmp_path / "cells.loom"
    loom.write_bytes(b"")
    (tmp_path / "tok").mkdir()
    assert RunRequest(data=str(loom)).validate() == []
    text = tmp_path / "cells.csv"
    text.write_text("")
    assert RunRequest(data=str(text)).validate() == [f"data file {text} is neither .h5ad nor .loom"]
    request = RunRequest(tokenized=str(tmp_path / "tok"), model=str(tmp_path), filters=["stim=a,b", "dose=0"])
    assert request.validate() == []
    argv = request.argv(tmp_path / "gfattn.db")
    assert argv[argv.index("--tokenized") + 1] == str(tmp_path / "tok")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--filter"] == ["stim=a,b", "dose=0"]
    both = RunRequest(data=str(loom), tokenized=str(tmp_path / "tok")).validate()
    assert "data file and tokenized dataset both given; pass one" in both
    assert any("needs the model dir" in p for p in both)
