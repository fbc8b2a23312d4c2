"""Your data, your labels: `gfattn pipeline` on real T-cell counts (DatlingerBock2021: CRISPR knockouts x
TCR stimulation) with a random-weight Geneformer V1-6L checkpoint built from the real config and the real
dictionaries. Asked in the user's words, answered in them: no dose, no uM, no low/high anywhere.

Each run is `gfattn pipeline` through `pipeline.cli.main(argv)` in the test's own process (its output
captured as a user would see it): the imports of torch and transformers, seconds per process, are paid once
per test worker; the subprocess runs of the suite are the session's quick run and the fault-injected ones."""

from __future__ import annotations

import textwrap

import pytest

from store import Store

from tests._helpers_cli import cli
from tests._helpers_model import save_geneformer_checkpoint
from tests._helpers_tokenize import datlinger_anndata

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tcells(shared, tmp_path_factory):
    path = tmp_path_factory.mktemp("tcells") / "datlinger.h5ad"
    datlinger_anndata(shared).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def v1_6l(geneformer_dir, tmp_path_factory):
    """Geneformer V1-6L as its config describes it (6 layers, 256 wide), random weights, no dictionaries."""
    d = tmp_path_factory.mktemp("model") / "gf-6L-random"
    save_geneformer_checkpoint(geneformer_dir / "configs" / "V1-6L-10M" / "config.json", d)
    return d


# analyses and attribution on 60 test cells
SMALL = textwrap.dedent("""
    [analysis]
    max_cells = 60
    n_boot = 20
""")
# a 6-layer model within the quick budget: the two models the analysis compares, 30 optimisation steps,
# analyses and attribution on 30 test cells with integrated gradients at the preset's 16 steps, no
# randomisation cascade (the quick run's) and no UMAP (the --quick run covers it)
SIX_LAYERS = textwrap.dedent("""
    [data]
    umap = false
    [train]
    epochs = 1
    min_steps = 30
    modes = ["frozen", "unfrozen"]
    [analysis]
    max_cells = 30
    n_boot = 20
    ig_max_steps = 16
    sanity = false
""")


@pytest.fixture(scope="module")
def v1_small(geneformer_dir, tmp_path_factory):
    """The real V1 config made small (2 layers, 64 wide): the same vocabulary and loading path, seconds to train."""
    d = tmp_path_factory.mktemp("model") / "gf-small-random"
    save_geneformer_checkpoint(
        geneformer_dir / "configs" / "V1-6L-10M" / "config.json",
        d,
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
    )
    return d


def _small_config(tmp_path, extra: str = "") -> str:
    return _config(tmp_path, SMALL + textwrap.dedent(extra))


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def _words_of(out) -> str:
    return out.stdout + out.stderr


def _assert_users_words(db, out, task: str, classes: list[str]):
    text = _words_of(out)
    for foreign in ("uM", "low", "high", "dose"):
        assert foreign not in text, (foreign, text[-3000:])
    st = Store(db)
    (run,) = st.list_runs(kind="pipeline")
    assert run["status"] == "completed"
    children = {c["name"]: c for c in st.children(run["id"])}
    data = children["data"]["id"]
    assert st.labels(data) == {task: classes}
    assert set(st.cells(data)[task]) == set(classes)
    for mode in ("frozen", "unfrozen"):
        (conf,) = st.confusions(children[f"{task}/{mode}"]["id"])
        assert conf["labels"] == classes and conf["matrix"].sum() > 0
    (de_name,) = [n for n, c in children.items() if c["kind"] == "de"]
    assert de_name == f"de: {classes[1]} vs {classes[0]}"
    de = st.gene_table_df(children[de_name]["id"], "de")
    assert de["ensembl_id"].str.startswith("ENSG0").all()
    # symbols on real data (from the dictionaries, else the data's own var; a gene the data names only
    # by its Ensembl ID has none)
    assert (de["symbol"] != "").mean() > 0.95
    analysis = children[f"{task}: frozen vs unfrozen"]["id"]
    genes = st.gene_table_df(analysis, "genes")
    assert {f"rank_mean_{c}" for c in classes} <= set(genes.columns)
    return st, children


def test_stimulated_vs_unstimulated_in_the_quick_budget(tcells, v1_6l, geneformer_dir, tmp_path):
    db = tmp_path / "gfattn.db"
    out = cli(
        "pipeline",
        "--quick",
        "--data",
        str(tcells),
        "--model",
        str(v1_6l),
        "--geneformer-dir",
        str(geneformer_dir),
        "--label-column",
        "perturbation_2",
        "--config",
        _config(tmp_path, SIX_LAYERS),
        "--store",
        str(db),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    st, children = _assert_users_words(db, out, "perturbation_2", ["stimulated", "unstimulated"])
    qc = st.get_json(children["data"]["id"], "qc_report")
    # the quick preset caps real data at 1,000 cells, stratified by class
    before, after = qc["cells_per_class_before"], qc["cells_per_class_after"]
    assert sum(after.values()) == 1000 and sum(before.values()) == 7500
    assert all(abs(after[c] - 1000 * before[c] / 7500) <= 1 for c in before)


def test_grouped_knockouts_with_a_filter(tcells, v1_small, geneformer_dir, tmp_path):
    cfg = tmp_path / "ko.toml"
    cfg.write_text(
        textwrap.dedent("""
        [[tasks]]
        name = "knockout"
        column = "perturbation"
        groups = {KO = ["ZAP70_1", "ZAP70_2", "LCK_1", "LCK_2"], ctrl = ["control"]}
        [data]
        filter = {perturbation_2 = ["stimulated"]}
        umap = false
        [train]
        modes = ["frozen", "unfrozen"]
        epochs = 2
        [analysis]
        pairs = [["frozen", "unfrozen"]]
        n_boot = 20
    """)
    )
    db = tmp_path / "gfattn.db"
    out = cli(
        "pipeline",
        "--quick",
        "--config",
        str(cfg),
        "--data",
        str(tcells),
        "--model",
        str(v1_small),
        "--geneformer-dir",
        str(geneformer_dir),
        "--store",
        str(db),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    st, children = _assert_users_words(db, out, "knockout", ["KO", "ctrl"])
    cells = st.cells(children["data"]["id"])
    assert set(cells["knockout"]) == {"KO", "ctrl"}
    # the counts a researcher would get from obs directly
    import anndata as ad

    obs = ad.read_h5ad(tcells, backed="r").obs
    stim = obs[obs["perturbation_2"] == "stimulated"]["perturbation"].astype(str)
    expected = {
        "KO": int(stim.isin(["ZAP70_1", "ZAP70_2", "LCK_1", "LCK_2"]).sum()),
        "ctrl": int((stim == "control").sum()),
    }
    qc = st.get_json(children["data"]["id"], "qc_report")
    assert qc["cells_per_class_after"] == expected


def test_no_checkpoint_pretrains_on_the_users_cells(tcells, geneformer_dir, tmp_path):
    """Only an .h5ad: gfattn's small model is pretrained on the data's training cells (never its test cells)."""
    db = tmp_path / "gfattn.db"
    # the quick preset's barely pretrained model may not learn this task; the deletion is computed anyway
    # (and marked) so that key scores and deletion effects can be compared
    mark = tmp_path / "mark.toml"
    mark.write_text('[data]\numap = false\n[analysis]\ngate = "mark"\n')  # UMAP: the --quick run covers it
    out = cli(
        "pipeline",
        "--quick",
        "--config",
        str(mark),
        "--data",
        str(tcells),
        "--geneformer-dir",
        str(geneformer_dir),
        "--label-column",
        "perturbation_2",
        "--store",
        str(db),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pretraining gfattn's small model" in out.stderr and "not Geneformer" in out.stdout
    # key genes on real counts: summed attention follows detection frequency (and is flagged), the
    # controlled key score does not, beyond what the model's own single-gene deletion effects do
    st = Store(db)
    (analysis,) = [r for r in st.list_runs(kind="analysis") if r["name"].endswith("frozen vs unfrozen")]
    key_genes = st.get_json(analysis["id"], "key_genes")
    rho = key_genes["frequency_spearman"]
    assert rho["attn_b"] > 0.8 and any("attn_b" in w for w in key_genes["warnings"])
    deletion = st.get_json(analysis["id"], "deletion_unfrozen")["frequency_spearman"]
    assert abs(rho["key_score_b"]) < 0.3
    assert abs(rho["key_score_b"]) <= abs(deletion["deletion_effect"]) + 0.2, (rho, deletion)
    assert "rankings that track detection frequency" in out.stdout
    st, children = _assert_users_words(db, out, "perturbation_2", ["stimulated", "unstimulated"])
    (run,) = st.list_runs(kind="pipeline")
    model_dir = st.get_run(run["id"])["model_path"]
    assert "/models/self-" in model_dir
    from pipeline.data.dictionaries import GeneDictionaries

    vocab = GeneDictionaries.from_model_dir(model_dir).token_dict
    assert 1000 < len(vocab) <= 2002  # the T cells' own genes (2,000 measured) plus <pad> and <mask>


def test_a_dataset_tokenized_beforehand(tcells, v1_small, geneformer_dir, tmp_path):
    """`--tokenized DIR`: cells a user already rank-value encoded, with their cell columns as labels."""
    tok = tmp_path / "tokenized"
    out = cli(
        "tokenize",
        str(tcells),
        "--out",
        str(tok),
        "--geneformer-dir",
        str(geneformer_dir),
        "--model-version",
        "V1",
        "--obs-columns",
        "perturbation_2",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    db = tmp_path / "gfattn.db"
    out = cli(
        "pipeline",
        "--quick",
        "--tokenized",
        str(tok),
        "--model",
        str(v1_small),
        "--geneformer-dir",
        str(geneformer_dir),
        "--label-column",
        "perturbation_2",
        "--config",
        _small_config(
            tmp_path,
            'pairs = [["frozen", "unfrozen"]]\n[train]\nmodes = ["frozen", "unfrozen"]\nepochs = 1\nmin_steps = 30\n',
        ),
        "--store",
        str(db),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    st = Store(db)
    (run,) = st.list_runs(kind="pipeline")
    children = {c["name"]: c for c in st.children(run["id"])}
    assert not [c for c in children.values() if c["kind"] == "de"]  # no counts, no DE
    (conf,) = st.confusions(children["perturbation_2/unfrozen"]["id"])
    assert conf["labels"] == ["stimulated", "unstimulated"] and conf["matrix"].sum() > 0
    assert children["perturbation_2: frozen vs unfrozen"]["status"] == "completed"


def test_no_checkpoint_with_symbols_needs_the_name_dictionary(tcells, tmp_path):
    db = tmp_path / "gfattn.db"
    out = cli("pipeline", "--quick", "--data", str(tcells), "--label-column", "perturbation_2", "--store", str(db))
    assert out.returncode == 2 and "--geneformer-dir" in out.stderr.strip().splitlines()[-1]
    assert Store(db).list_runs() == []


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--label-column", "genotype"], "obs column 'genotype' does not exist"),
        (["--label-column", "perturbation", "--classes", "ZAP70_1,PTEN_9"], "class 'PTEN_9' does not occur"),
        (
            [
                "--label-column",
                "perturbation_2",
                "--filter",
                "perturbation=ZAP70_1",
                "--filter",
                "perturbation_2=stimulated",
            ],
            "class(es) unstimulated select no cell after data.filter",
        ),
        (["--label-column", "perturbation_2", "--filter", "perturbation=NOPE*"], "keeps no cell"),
    ],
)
def test_bad_labels_are_refused_before_a_run_is_recorded(tcells, v1_6l, geneformer_dir, tmp_path, args, needle):
    db = tmp_path / "gfattn.db"
    out = cli(  # refused before any work: in this process
        "pipeline",
        "--quick",
        "--data",
        str(tcells),
        "--model",
        str(v1_6l),
        "--geneformer-dir",
        str(geneformer_dir),
        *args,
        "--store",
        str(db),
    )
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("gfattn pipeline: error:") and needle in last, last
    assert Store(db).list_runs() == []
