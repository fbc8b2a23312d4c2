"""The experiment configuration (defaults, presets, typos) and the thesis design (selection, labels, splits)."""

import numpy as np
import pandas as pd
import pytest

from pipeline import config
from pipeline.design import parse_doses, select_cells, stratified_split
from pipeline.errors import InputError


def test_every_preset_resolves_and_validates():
    for name in config.PRESETS:
        cfg = config.resolve(name)
        assert cfg["run"]["preset"] == name
        assert set(cfg) == set(config.SCHEMA)


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
        ("[train]\nepochs = 'five'\n", "train.epochs must be int"),
        ("[train]\nmodes = ['frozen', 'half']\n[analysis]\npairs = []\n", "unknown training mode 'half'"),
        ("[split]\ntest = 0.6\nvalidation = 0.4\n", "leave at least 10%"),
        ("[analysis]\npairs = [['frozen', 'last-2']]\n", "not among train.modes"),
        ("[labels]\nlow_doses = [0.0, 12.5]\n", "overlap"),
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


def test_selection_keeps_the_thesis_doses_and_vehicle():
    cfg = config.resolve("default")
    sel = select_cells(_obs(), cfg)
    assert sorted(set(sel.dose)) == [0.0, 1.25, 2.5, 12.5, 25.0]
    assert "c0" not in sel.cell_ids and "c9" not in sel.cell_ids and "c16" not in sel.cell_ids
    assert sel.counts_before["0.25 uM"] == 1 and sel.counts_before["250 uM"] == 1
    y, names = sel.labels("dose")
    assert names == ["0 uM", "1.25 uM", "2.5 uM", "12.5 uM", "25 uM"]
    assert [names[i] for i in y] == list(sel.dose_names)
    y2, names2 = sel.labels("lowhigh")
    assert names2 == ["low", "high"]
    assert np.array_equal(y2, (sel.dose >= 12.5).astype(int))


def test_dose_multiplier_and_text_doses():
    obs = _obs()
    obs["dose_value"] = [f"{d / 2.5:g}uM" for d in obs["dose_value"]]
    cfg = config.resolve("default", flags={"data.dose_multiplier": 2.5})
    sel = select_cells(obs, cfg)
    assert sorted(set(sel.dose)) == [0.0, 1.25, 2.5, 12.5, 25.0]
    assert parse_doses(pd.Series(["10 µM", "x"]), "d")[0] == 10.0


def test_selection_errors_name_the_column_or_value():
    cfg = config.resolve("default", flags={"data.dose_column": "dose"})
    with pytest.raises(InputError, match="'dose'"):
        select_cells(_obs(), cfg)
    cfg = config.resolve("default", flags={"data.perturbation": "Trametinib"})
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
