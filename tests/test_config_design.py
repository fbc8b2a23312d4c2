"""The experiment configuration (defaults, presets, typos) and the design (tasks on any obs column, the
filter, labels, splits), checked against the thesis design computed directly."""

import numpy as np
import pandas as pd
import pytest

from pipeline import config
from pipeline.data.design import parse_numbers, select_cells, stratified_split
from pipeline.errors import InputError


def test_every_preset_resolves_and_validates():
    for name in config.PRESETS:
        cfg = config.resolve(name)
        assert cfg["run"]["preset"] == name
        assert set(cfg) == set(config.SCHEMA) | {"tasks"}


def test_layers_override_in_order(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nepochs = 9\nbatch_size = 4\n")
    cfg = config.resolve("default", path, {"train.epochs": 2, "run.seed": None})
    assert cfg["train"]["epochs"] == 2  # flag beats file
    assert cfg["train"]["batch_size"] == 4  # file beats preset
    assert cfg["run"]["seed"] == 0  # None flags do not override


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("[trian]\nepochs = 1\n", "did you mean `train`"),
        ("[train]\nlearning_rate = 1.0\n", "train.learning_rate"),
        ("[train]\nepochs = 'five'\n", 'train.epochs = "five"; allowed: an integer >= 1'),
        ("[train]\nmodes = ['frozen', 'half']\n[analysis]\npairs = []\n", "unknown training mode 'half'"),
        ("[split]\ntest = 0.6\nvalidation = 0.4\n", "allowed: at least 10%"),
        ("[analysis]\npairs = [['frozen', 'last-2']]\n", "not among train.modes"),
        ("[[tasks]]\nname = 'x'\n", "needs a `column`"),
        ("[[tasks]]\nname = 'x'\ncolumn = 'c'\nlabel = 'y'\n", "unknown key tasks[0].label"),
        ("[[tasks]]\nname = 'x'\ncolumn = 'c'\nclasses = ['a']\n", "at least two"),
        ("[train]\ntasks = ['nope']\n", "train.tasks: 'nope' is not a task"),
        ("[pretrain]\ncorpus = 'tissue'\n", 'pretrain.corpus = "tissue"; allowed: one of healthy, atlas'),
        ("[pretrain]\ncell_objective = 'pixels'\n", "allowed: one of genes, components"),
        ("[pretrain]\ncell_components = 0\n", "pretrain.cell_components = 0; allowed: an integer >= 1"),
        ("[pretrain]\nlineage_cells = -5\n", "pretrain.lineage_cells = -5; allowed: an integer >= 0"),
    ],
)
def test_bad_config_is_a_one_line_input_error(tmp_path, toml, needle):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(InputError) as err:
        config.resolve("default", path)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_suggests():
    with pytest.raises(InputError, match="did you mean `quick`"):
        config.resolve("quik")


def test_modes_parse():
    assert config.parse_mode("last-1") == ("last", 1)
    assert config.parse_mode("freeze-4") == ("freeze", 4)
    with pytest.raises(InputError):
        config.parse_mode("last-0")


def _obs():
    pert = ["Nutlin"] * 12 + ["vehicle"] * 4 + ["Imatinib"] * 3
    dose = [0.25, 1.25, 1.25, 2.5, 2.5, 12.5, 12.5, 25, 25, 125, 250, 1.25, 0, 0, 0, 0, 1.25, 2.5, 25]
    return pd.DataFrame({"perturbation": pert, "dose_value": dose}, index=[f"c{i}" for i in range(len(pert))])


def _thesis_selection(obs, seed=0):
    """The thesis design computed directly: Nutlin (prefix) and vehicle cells at 0/1.25/2.5/12.5/25 uM, one
    class per dose and low (<= 2.5) vs high, the split stratified by dose (the first version's own code)."""
    pert = obs["perturbation"].astype(str).str.lower()
    dose = np.round(obs["dose_value"].to_numpy(dtype=float), 6)
    keep = (pert.str.startswith("nutlin") | pert.isin(["control", "vehicle", "dmso"])).to_numpy()
    keep &= np.isin(dose, [0.0, 1.25, 2.5, 12.5, 25.0])
    idx = np.flatnonzero(keep)
    names = np.array([f"{d:g} uM" for d in dose[idx]])
    return idx, names, (dose[idx] >= 12.5).astype(int), stratified_split(names, 0.15, 0.15, seed)


def test_sciplex_tasks_in_the_general_form_reproduce_the_thesis_design():
    from pipeline.data.synth import make_sciplex_like

    obs = make_sciplex_like(scale=0.15, preset="thesis", seed=0).obs
    for preset in ("default", "quick"):
        cfg = config.resolve(preset)
        sel = select_cells(obs, cfg)
        idx, dose_names, high, split = _thesis_selection(obs)
        assert np.array_equal(sel.index, idx)
        codes, names = sel.labels("dose")
        assert names == ["0 uM", "1.25 uM", "2.5 uM", "12.5 uM", "25 uM"]
        assert list(np.asarray(names)[codes]) == list(dose_names)
        codes, names = sel.labels("lowhigh")
        assert names == ["low", "high"] and np.array_equal(codes, high)
        assert np.array_equal(stratified_split(sel.strata, 0.15, 0.15, 0), split)


def test_selection_keeps_the_thesis_doses_and_vehicle():
    cfg = config.resolve("default")
    sel = select_cells(_obs(), cfg)
    assert set(sel.class_names("dose")) == {"0 uM", "1.25 uM", "2.5 uM", "12.5 uM", "25 uM"}
    assert "c0" not in sel.cell_ids and "c9" not in sel.cell_ids and "c16" not in sel.cell_ids
    y, names = sel.labels("dose")
    assert names == ["0 uM", "1.25 uM", "2.5 uM", "12.5 uM", "25 uM"]
    y2, names2 = sel.labels("lowhigh")
    assert names2 == ["low", "high"]
    assert np.array_equal(y2, (y >= 3).astype(int))


def test_scale_and_text_values():
    obs = _obs()
    obs["dose_value"] = [f"{d / 2.5:g}uM" for d in obs["dose_value"]]
    cfg = config.resolve("default")
    for t in cfg["tasks"]:
        t["scale"] = 2.5
    sel = select_cells(obs, cfg)
    assert set(sel.class_names("dose")) == {"0 uM", "1.25 uM", "2.5 uM", "12.5 uM", "25 uM"}
    assert parse_numbers(pd.Series(["10 µM", "2.5uM"]))[0] == 10.0
    assert parse_numbers(pd.Series(["ZAP70_1", "LCK_1"])) is None


def test_any_column_classes_groups_and_filter():
    obs = pd.DataFrame(
        {
            "ko": ["ZAP70_1", "ZAP70_2", "LCK_1", "control", "control", "CD3E_1"] * 4,
            "stim": ["stimulated", "unstimulated"] * 12,
        },
        index=[f"c{i}" for i in range(24)],
    )
    cfg = config.resolve(
        "default",
        flags={
            "tasks": [
                {"name": "ko", "column": "ko", "groups": {"KO": ["ZAP70_1", "ZAP70_2", "LCK_1"], "ctrl": ["control"]}}
            ],
            "data.filter": {"stim": ["stim*"]},
        },
    )
    sel = select_cells(obs, cfg)
    assert sel.names["ko"] == ["KO", "ctrl"]
    # the filter keeps stimulated cells only (ZAP70_2 and CD3E_1 are all unstimulated; CD3E_1 is in no group)
    assert set(obs.loc[sel.cell_ids, "stim"]) == {"stimulated"}
    assert set(obs.loc[sel.cell_ids, "ko"]) == {"ZAP70_1", "LCK_1", "control"}
    cfg = config.resolve("default", flags={"tasks": [{"name": "stim", "column": "stim"}]})
    assert cfg["data"]["filter"] == {}  # own tasks drop the sci-Plex filter
    assert select_cells(obs, cfg).names["stim"] == ["stimulated", "unstimulated"]


@pytest.mark.parametrize(
    "task, filt, needle",
    [
        ({"name": "t", "column": "nope"}, {}, "obs column 'nope' does not exist"),
        (
            {"name": "t", "column": "ko", "groups": {"a": ["ZAP70_1"], "b": ["PTEN_9"]}},
            {},
            "'PTEN_9', which does not occur",
        ),
        ({"name": "t", "column": "ko", "classes": ["ZAP70_1", "XX"]}, {}, "class 'XX' does not occur"),
        ({"name": "t", "column": "ko"}, {"stim": ["never"]}, "keeps no cell"),
    ],
)
def test_bad_labels_are_one_line_errors(task, filt, needle):
    obs = pd.DataFrame({"ko": ["ZAP70_1", "LCK_1", "control"] * 4, "stim": ["a", "b"] * 6})
    cfg = config.resolve("default", flags={"tasks": [task], "data.filter": filt or None})
    with pytest.raises(InputError) as err:
        select_cells(obs, cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_selection_errors_name_the_column_or_value():
    cfg = config.resolve("default", flags={"data.filter": {"perturbation": ["Trametinib*"]}})
    with pytest.raises(InputError, match="Imatinib"):
        select_cells(_obs(), cfg)


def test_stratified_split_is_seeded_and_stratified():
    strata = np.repeat(["a", "b", "c"], [40, 20, 60])
    s1 = stratified_split(strata, 0.15, 0.15, seed=3)
    s2 = stratified_split(strata, 0.15, 0.15, seed=3)
    assert np.array_equal(s1, s2)
    assert not np.array_equal(s1, stratified_split(strata, 0.15, 0.15, seed=4))
    for s in ("a", "b", "c"):
        members = s1[strata == s]
        assert {"train", "validation", "test"} <= set(members)
        assert abs((members == "test").mean() - 0.15) < 0.05
    with pytest.raises(InputError, match="class z has 2 cells"):
        stratified_split(np.array(["z", "z", "y", "y", "y"]), 0.2, 0.2, 0)
