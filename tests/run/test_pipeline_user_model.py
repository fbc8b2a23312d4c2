"""`gfattn pipeline` on a user's `.h5ad` and a user's Geneformer-shaped checkpoint (the real V1 config and
dictionaries, random weights), and `--resume` of a failed run from its first unfinished stage."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests._helpers_cli import cli

# a model and data small enough for seconds per stage; UMAP is covered by the --quick run
TINY = textwrap.dedent("""
    [data]
    umap = false
    [model]
    max_len = 64
    [train]
    tasks = ["lowhigh"]
    modes = ["frozen", "unfrozen"]
    epochs = 2
    batch_size = 16
    lr = 3e-3
    [analysis]
    tasks = ["lowhigh"]
    pairs = [["frozen", "unfrozen"]]
    n_boot = 20
    top_k = [10, 20]
    deletion_k = [5]
    deletion_random_sets = 3
    deletion_top_genes = 5
    sanity_attribution = false
    [compute]
    threads = 1
""")


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory, geneformer_dir):
    """A checkpoint directory as Geneformer ships one: the V1 config (made small), `pytorch_model.bin`,
    no dictionaries of its own (they come from --geneformer-dir)."""
    from tests._helpers_model import save_geneformer_checkpoint

    d = tmp_path_factory.mktemp("checkpoint") / "geneformer-small"
    config = save_geneformer_checkpoint(
        geneformer_dir / "configs" / "V1-6L-10M" / "config.json",
        d,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return d, config["vocab_size"]


@pytest.fixture(scope="module")
def user_h5ad(tmp_path_factory, geneformer_dir):
    """sci-Plex-like counts whose genes are all real Geneformer vocabulary genes, with a user's obs columns."""
    from pipeline.data.synth import make_sciplex_like

    adata = make_sciplex_like(scale=0.12, preset="thesis", seed=3, geneformer_dir=geneformer_dir)
    adata.uns.pop("gfattn_truth", None)
    path = tmp_path_factory.mktemp("userdata") / "nutlin.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.mark.slow
def test_user_data_and_checkpoint_run_end_to_end(tmp_path, user_checkpoint, user_h5ad, geneformer_dir):
    from store import Store

    model_dir, vocab_size = user_checkpoint
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    db = tmp_path / "gfattn.db"
    out = cli(
        "pipeline",
        "--data",
        str(user_h5ad),
        "--model",
        str(model_dir),
        "--geneformer-dir",
        str(geneformer_dir),
        "--config",
        str(cfg),
        "--store",
        str(db),
        "--name",
        "user",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("run 1 'user' completed"), out.stdout[:500]
    assert "lowhigh/unfrozen" in out.stdout and "key genes vs top DE genes" in out.stdout

    st = Store(db)
    run = st.get_run(1)
    assert run["status"] == "completed"
    assert run["model_path"] == str(model_dir) and run["data_path"] == str(user_h5ad)
    assert run["config"]["model"]["geneformer_dir"] == str(geneformer_dir)
    from pipeline.tokenize.encode import hash_file

    assert run["data_hash"] == hash_file(user_h5ad)
    assert run["model_hash"] == hash_file(model_dir / "pytorch_model.bin")
    children = {c["name"]: c for c in st.children(1)}
    assert set(children) >= {"lowhigh/frozen", "lowhigh/unfrozen", "de: high vs low", "lowhigh: frozen vs unfrozen"}
    assert all(c["status"] == "completed" for c in children.values())

    # the fine-tuned models keep the checkpoint's vocabulary (real V1 dictionary, 25,426 tokens)
    from pipeline.models.load import read_model_config

    ft_dir = Path(st.get_json(children["lowhigh/unfrozen"]["id"], "checkpoint")["path"])
    assert ft_dir == db.parent / ".gfattn-cache" / "runs" / st.uid / "1" / "lowhigh__unfrozen"
    assert read_model_config(ft_dir).vocab_size == vocab_size

    # DE and attention genes are real Ensembl IDs with symbols from the real dictionaries
    de = st.gene_table_df(children["de: high vs low"]["id"], "de")
    assert de["ensembl_id"].str.startswith("ENSG0").all()
    assert "CDKN1A" in set(de["symbol"].head(20))
    analysis = children["lowhigh: frozen vs unfrozen"]["id"]
    tables = st.gene_tables(analysis)
    assert tables, "the attention analysis wrote no gene table"
    genes = st.gene_table_df(analysis, tables[0])
    assert len(genes) > 50 and genes["ensembl_id"].str.startswith("ENSG0").all()


def _tiny_embedded_config(tmp_path):
    """The TINY design on a small synthetic data set and an embedded model pretrained for seconds."""
    from pipeline import config as config_mod

    path = tmp_path / "tiny.toml"
    path.write_text(
        TINY.replace("umap = false", "umap = false\nsynth_scale = 0.08")
        + textwrap.dedent("""
        [pretrain]
        corpus_cells = 300
        layers = 1
        hidden = 16
        heads = 2
        intermediate = 32
        max_len = 64
        epochs = 1
        time_budget_s = 5.0
    """)
    )
    return config_mod.resolve("default", path)


def test_resume_continues_a_failed_run_from_its_first_unfinished_stage(tmp_path, monkeypatch, capsys):
    import pipeline.analysis.pair as analysis
    from pipeline.run.driver import resume_pipeline, run_pipeline
    from store import Store

    cfg = _tiny_embedded_config(tmp_path)
    db = tmp_path / "gfattn.db"

    def broken(*args, **kwargs):
        raise RuntimeError("injected DE failure")

    monkeypatch.setattr(analysis, "de_wilcoxon", broken)
    assert run_pipeline(cfg, db) == 1
    err = capsys.readouterr().err
    assert "injected DE failure" in err and "gfattn pipeline --resume 1" in err
    st = Store(db)
    assert st.get_run(1)["status"] == "failed"
    before = {c["name"]: (c["id"], c["status"]) for c in st.children(1)}
    assert before["lowhigh/frozen"][1] == before["lowhigh/unfrozen"][1] == "completed"
    assert before["de: high vs low"][1] == "failed"
    assert "lowhigh: frozen vs unfrozen" not in before

    monkeypatch.undo()
    assert resume_pipeline("1", db) == 0
    captured = capsys.readouterr()
    assert "already fine-tuned (resumed)" in captured.err
    assert captured.out.startswith("run 1 ")
    st = Store(db)
    run = st.get_run(1)
    assert run["status"] == "completed"
    # the generated data set and the cached embedded model are recorded with their content hashes
    assert run["data_path"].endswith(".h5ad") and len(run["data_hash"]) == 64
    assert "embedded-" in run["model_path"] and len(run["model_hash"]) == 64
    after = st.children(1)
    names = [c["name"] for c in after]
    assert sorted(names) == sorted(set(names)), "a stage was recorded twice"
    by_name = {c["name"]: c for c in after}
    # fine-tuning was not repeated: the same child runs, and the failed DE attempt was replaced
    assert by_name["lowhigh/frozen"]["id"] == before["lowhigh/frozen"][0]
    assert by_name["lowhigh/unfrozen"]["id"] == before["lowhigh/unfrozen"][0]
    assert by_name["de: high vs low"]["id"] != before["de: high vs low"][0]
    assert all(c["status"] == "completed" for c in after)
    assert len(st.gene_table_df(by_name["de: high vs low"]["id"], "de")) > 0

    # a completed run cannot be resumed: a one-line error and exit code 2
    out = cli("pipeline", "--resume", "1", "--store", str(db))
    assert out.returncode == 2 and "already completed" in out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_pipeline_fine_tunes_with_two_processes(tmp_path, capsys):
    """`compute.nproc = 2` fine-tunes the run's models in two processes started once (torchrun, gloo on CPU)
    and records each as usual."""
    from pipeline.run.driver import run_pipeline
    from store import Store

    cfg = _tiny_embedded_config(tmp_path)
    cfg["compute"]["nproc"] = 2
    # fine-tuning in two processes; the analysis in two processes is the warm rerun's (test_pipeline_reproducible)
    cfg["compute"]["analysis_nproc"] = 1
    # what follows fine-tuning is the pair analysis alone (deletion and the cascade: the other end-to-end runs)
    cfg["analysis"].update(de=False, deletion=False, sanity=False)
    db = tmp_path / "gfattn.db"
    assert run_pipeline(cfg, db) == 0, capsys.readouterr().err[-3000:]
    # one torchrun launch fine-tunes both models, started once the cells are tokenized (beside the record stage)
    err = capsys.readouterr().err
    assert err.count("fine-tuning in 2 processes (torchrun), started once") == 1, err[-3000:]
    assert err.index("fine-tuning in 2 processes") < err.index("record     started") < err.index("finetune ")
    st = Store(db)
    children = {c["name"]: c for c in st.children(1)}
    for mode in ("frozen", "unfrozen"):
        child = children[f"lowhigh/{mode}"]
        assert child["status"] == "completed"
        test_accuracy = st.metrics(child["id"], name="accuracy", split="test")
        assert len(test_accuracy) == 1 and 0.0 <= test_accuracy[0]["value"] <= 1.0
        assert any(c["split"] == "test" and c["matrix"].sum() > 0 for c in st.confusions(child["id"]))
        # rank 0's reports reached the parent over the job channel and were recorded on the child there
        progress = st.progress(child["id"])
        assert progress["unit"] == "steps" and progress["done"] == progress["total"] > 0
        assert any(e["message"].startswith(f"fine-tuning {mode}:") for e in st.events(child["id"]))
        assert (db.parent / ".gfattn-cache" / "runs" / st.uid / "1" / f"lowhigh__{mode}" / "config.json").is_file()
    assert children["lowhigh: frozen vs unfrozen"]["status"] == "completed"


def test_fine_tuning_processes_start_early_only_where_a_model_is_left_to_fine_tune(monkeypatch):
    """Once the cells are tokenized the run starts its fine-tuning processes where a model is left to
    fine-tune; a resumed run whose models are all fine-tuned starts none; one process never does."""
    from types import SimpleNamespace

    from pipeline import config
    from pipeline.config import finetune_stages
    from pipeline.parallel import launch
    from pipeline.run.stages.finetune import PERMUTED, finetune_name, start_finetune_workers
    from store import results as R

    started = []
    monkeypatch.setattr(launch, "finetune_workers", lambda nproc: started.append(nproc) or f"workers of {nproc}")
    cfg = config.resolve("quick", None, {"compute.nproc": 2, "analysis.label_permutation": True})
    names = [finetune_name(*stage) for stage in finetune_stages(cfg)]
    assert names == ["lowhigh/frozen", "lowhigh/unfrozen", "lowhigh/last-1"] + [
        f"lowhigh/{m}{PERMUTED}" for m in ("frozen", "unfrozen")
    ]

    def ctx(children, nproc=2):
        run = dict(cfg, compute={**cfg["compute"], "nproc": nproc})
        store = SimpleNamespace(children=lambda run_id: children)
        rep = SimpleNamespace(line=lambda text: None)
        return SimpleNamespace(cfg=run, store=store, run_id=1, rep=rep, out=SimpleNamespace(finetune_workers=None))

    every = [{"name": n, "kind": R.KIND_FINETUNE, "status": "completed"} for n in names]
    assert start_finetune_workers(ctx(every), early=True) is None and started == []
    one_failed = every[:-1] + [{**every[-1], "status": "failed"}]
    assert start_finetune_workers(ctx(one_failed), early=True) == "workers of 2" and started == [2]
    assert start_finetune_workers(ctx([], nproc=1), early=True) is None and started == [2]
