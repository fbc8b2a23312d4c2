"""`gfattn pipeline`: the thesis experiment end to end, headless (see pipeline/run/driver.py)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from pipeline.paths import add_store_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.config import PRESETS

    add_store_argument(p)
    p.add_argument(
        "--preset", default=None, choices=list(PRESETS), help="; ".join(f"{k}: {v}" for k, v in PRESETS.items())
    )
    p.add_argument("--quick", action="store_true", help="alias of --preset quick: a tiny run for smoke tests")
    p.add_argument("--config", metavar="FILE.toml", help="TOML config (see --print-config for every key)")
    p.add_argument(
        "--data", metavar="FILE.h5ad", help="raw-count AnnData, .h5ad or .loom (default: synthetic sci-Plex-like data)"
    )
    p.add_argument(
        "--tokenized", metavar="DIR", help="a dataset tokenized by Geneformer, with its cell columns, instead of --data"
    )
    p.add_argument(
        "--model",
        metavar="DIR",
        help="Geneformer checkpoint dir (default `embedded`: gfattn's small model, pretrained on your data)",
    )
    p.add_argument("--geneformer-dir", metavar="DIR", help="Geneformer dictionaries when the model dir has none")
    p.add_argument("--layer", metavar="NAME", help="layer of --data holding the raw counts (data.layer; default: X)")
    p.add_argument(
        "--gene-id-column",
        metavar="NAME",
        help="var column of --data with Ensembl IDs or symbols (data.gene_id_column; default: the var index)",
    )
    p.add_argument(
        "--n-counts-column",
        metavar="NAME",
        help="obs column of --data with each cell's total counts (data.n_counts_column)",
    )
    p.add_argument(
        "--label-column",
        metavar="COL",
        help="classify cells by this obs column (one task named after it; replaces the preset's tasks)",
    )
    p.add_argument("--classes", metavar="A,B", help="with --label-column: the values kept as classes, in order")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="COL=V1,V2",
        help="keep only cells whose COL is one of the values (`*` wildcards); repeat for AND",
    )
    p.add_argument("--fixed-length", type=int, metavar="N", help="every cell keeps exactly N genes (thesis 5.1)")
    p.add_argument("--name", help="run name")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs")
    p.add_argument("--seed", type=int, help="seed for everything")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="compute device")
    p.add_argument(
        "--nproc", type=int, help="processes for data-parallel fine-tuning and the sharded analysis (torchrun)"
    )
    p.add_argument(
        "--analysis-nproc",
        type=int,
        metavar="N",
        help="processes that analyse each model, the cells' batches shared out (default: --nproc)",
    )
    p.add_argument(
        "--reference-set", metavar="FILE", help="reference gene set (e.g. p53 targets) marked in gene tables"
    )
    p.add_argument(
        "--resume", metavar="RUN", help="continue a failed or interrupted run from its first unfinished stage"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print each stage's work and estimated time on this device (a few timed batches) and exit; "
        "records nothing",
    )


def run(args) -> int:
    from pipeline import config
    from pipeline.paths import resolve_store_path

    preset = (
        "quick"
        if args.quick
        else (
            args.preset or ("sciplex2-nutlin" if args.data and args.model and args.model != "embedded" else "default")
        )
    )
    flags = {
        "data.path": args.data,
        "data.tokenized": args.tokenized,
        "data.fixed_length": args.fixed_length,
        "data.layer": args.layer,
        "data.gene_id_column": args.gene_id_column,
        "data.n_counts_column": args.n_counts_column,
        "model.path": args.model,
        "model.geneformer_dir": args.geneformer_dir,
        "run.name": args.name,
        "run.seed": args.seed,
        "train.epochs": args.epochs,
        "compute.device": args.device,
        "compute.nproc": args.nproc,
        "compute.analysis_nproc": args.analysis_nproc,
        "analysis.reference_set": args.reference_set,
    }
    flags.update(_task_flags(args))
    store_path = resolve_store_path(args.store)
    if args.resume and args.plan:
        from pipeline.errors import InputError

        raise InputError("--plan plans a new run; it does not take --resume")
    if args.resume:
        from pipeline.run.driver import resume_pipeline

        return resume_pipeline(args.resume, store_path)
    cfg = config.resolve(preset, args.config, flags)
    if args.print_config:
        print(config.to_toml(cfg))
        return 0
    if args.plan:
        import sys

        from pipeline.run.plan import format_plan

        def say(message: str) -> None:
            print(f"plan: {message}", file=sys.stderr, flush=True)

        print("\n".join(format_plan(plan_before_run(cfg, store_path, say=say))))
        return 0
    from pipeline.run.driver import run_pipeline

    return run_pipeline(cfg, store_path)


def _task_flags(args) -> dict:
    """`--label-column`, `--classes` and `--filter` as config overrides (a task named after its column)."""
    from pipeline.errors import InputError

    out: dict = {}
    if args.classes and not args.label_column:
        raise InputError("--classes needs --label-column (the obs column whose values they are)")
    if args.label_column:
        task = {"name": args.label_column, "column": args.label_column}
        if args.classes:
            classes = [c.strip() for c in args.classes.split(",") if c.strip()]
            if len(classes) < 2:
                raise InputError(f"--classes {args.classes!r}: name at least two classes, separated by commas")
            task["classes"] = classes
        out["tasks"] = [task]
    if args.filter:
        filters: dict = {}
        for item in args.filter:
            column, sep, values = item.partition("=")
            if not sep or not column.strip() or not values.strip():
                raise InputError(f"--filter {item!r}: write COLUMN=VALUE1,VALUE2")
            filters.setdefault(column.strip(), []).extend(v.strip() for v in values.split(",") if v.strip())
        out["data.filter"] = filters
    return out


# ------------------------------------------------------------------------------------------ --plan
class _Quiet:
    def line(self, *_a, **_k) -> None:
        pass


def _pretrain_config(cfg: dict, vocab: int):
    from transformers import BertConfig

    p = cfg["pretrain"]
    return BertConfig(
        vocab_size=int(vocab),
        hidden_size=int(p["hidden"]),
        num_hidden_layers=int(p["layers"]),
        num_attention_heads=int(p["heads"]),
        intermediate_size=int(p["intermediate"]),
        hidden_act="relu",
        max_position_embeddings=int(p["max_len"]),
        type_vocab_size=2,
        pad_token_id=0,
    )


def _existing_model(cfg: dict, cache) -> tuple[Any, str, int]:
    """(model dir or None, where the model comes from, corpus cells pretrained in the model stage)."""
    from pathlib import Path

    from pipeline.models import embedded

    if cfg["model"]["path"]:
        return Path(cfg["model"]["path"]), "given", 0
    pcfg = dict(cfg["pretrain"])
    if cfg["data"]["path"]:
        return None, "pretrained on the data's training cells in this run (timed with random weights)", -1
    seed = embedded.model_seed(pcfg, int(cfg["run"]["seed"]))
    key = embedded.recipe_key(embedded.recipe(pcfg, cfg["data"]["synth_preset"], seed))
    shipped = embedded.shipped_model(key)
    if shipped is not None:
        return shipped, "shipped with gfattn", 0
    out = cache / "models" / f"embedded-{key}"
    if (out / "config.json").is_file():
        return out, "cached", 0
    corpus = int(pcfg["corpus_cells"]) + int(pcfg.get("lineage_cells", 0))
    return None, "pretrained on a synthetic corpus in this run (timed with random weights)", corpus


def _sample(n: int, seed: int) -> np.ndarray:
    import numpy as np

    from pipeline.run import plan as P

    if n <= P.SAMPLE_CELLS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, P.SAMPLE_CELLS, replace=False))


def _detected_lengths(adata, max_len: int, cls_token: bool, layer: str | None):
    """Without the model's dictionaries (a model pretrained in the run): each cell's detected genes, its
    `max_len` most counted kept, as the lengths and token lists of the encoding (gene indices as tokens)."""
    import numpy as np
    import scipy.sparse as sp

    x = adata.layers[layer] if layer else adata.X
    x = sp.csr_matrix(x)
    extra = 2 if cls_token else 0
    lists, lengths = [], []
    for i in range(x.shape[0]):
        row = x.getrow(i)
        order = np.argsort(-row.data, kind="stable")[: max(int(max_len) - extra, 0)]
        genes = row.indices[order] + 10
        lists.append(genes.tolist())
        lengths.append(len(genes) + extra)
    return np.asarray(lengths, dtype=np.int64), lists


def plan_before_run(cfg: dict, store_path, say=None) -> dict:
    """`gfattn pipeline --plan`: the plan of the run `cfg` describes, recording nothing in the store.
    `say(message)` hears what it is doing (the CLI prints it on stderr)."""
    import time
    from pathlib import Path

    import numpy as np

    from pipeline.compute import resolve_device
    from pipeline.models.load import read_model_config
    from pipeline.paths import cache_dir_for_store
    from pipeline.run import plan as P
    from pipeline.run.preflight import preflight, read_obs, select_and_split
    from pipeline.run.stages.data import synthetic_data_path
    from pipeline.run.stages.de import de_comparisons
    from pipeline.run.stages.finetune import PERMUTED
    from pipeline.run.stages.model import _dictionaries_for, model_input_size

    say = say or (lambda _m: None)
    t0 = time.perf_counter()
    cache = cache_dir_for_store(store_path)
    pre = preflight(cfg, cache)
    seed = int(cfg["run"]["seed"])
    data_cached = True
    if cfg["data"]["tokenized"] or cfg["data"]["path"]:
        read_path, sel, split, n_obs = pre.read_path, pre.selection, pre.split, pre.obs_rows
    else:
        from types import SimpleNamespace

        ctx = SimpleNamespace(cfg=cfg, cache=cache, seed=seed, rep=_Quiet())
        say("synthetic data (generated into the cache once, as the run would)")
        path = synthetic_data_path(ctx)  # generated into the cache once, as the run would
        read_path = str(path)
        obs = read_obs(read_path)
        sel, split = select_and_split(obs, cfg)
        n_obs = len(obs)
    model_dir, source, pretrain_cells = _existing_model(cfg, cache)
    dicts = None
    if model_dir is not None:
        from pipeline.data.dictionaries import GeneDictionaries

        dicts = (
            _dictionaries_for(Path(model_dir), cfg)
            if cfg["model"]["path"]
            else GeneDictionaries.from_model_dir(model_dir)
        )
        max_len = model_input_size(Path(model_dir), dicts, cfg["model"]["max_len"])
        config = read_model_config(model_dir)
    else:
        max_len = int(cfg["model"]["max_len"] or cfg["pretrain"]["max_len"])
        config = None
    if pretrain_cells < 0:  # pretrained on the training cells
        pretrain_cells = int((np.asarray(split) == "train").sum())
    rows = _sample(len(sel.index), seed)
    say(f"lengths of {len(rows)} of the {len(sel.index)} selected cells")
    if cfg["data"]["tokenized"]:
        from pipeline.tokenize.encode import load_tokenized

        ds = load_tokenized(cfg["data"]["tokenized"])
        order = {str(c): i for i, c in enumerate(ds["cell_id"])}
        sub = ds.select([order[str(c)] for c in np.asarray(sel.cell_ids)[rows]])
        lists = [list(x)[:max_len] for x in sub["input_ids"]]
        lengths = np.asarray([len(x) for x in lists], dtype=np.int64)
    else:
        from pipeline.data.counts import read_selected

        adata = read_selected(read_path, np.asarray(sel.index)[rows])
        if dicts is not None:
            from pipeline.tokenize.encode import tokenize_anndata

            ds, _ = tokenize_anndata(
                adata,
                dicts,
                max_len=max_len,
                n_counts_column=cfg["data"]["n_counts_column"] or None,
                gene_id_column=cfg["data"]["gene_id_column"] or None,
                layer=cfg["data"]["layer"] or None,
            )
            lists = [list(x) for x in ds["input_ids"]]
            lengths = np.asarray(ds["length"], dtype=np.int64)
        else:
            cls = bool(cfg["pretrain"].get("cls_token", False))
            lengths, lists = _detected_lengths(adata, max_len, cls, cfg["data"]["layer"] or None)
            vocab = int(adata.n_vars) + 10
            config = _pretrain_config(cfg, vocab)
    n_fixed = int(cfg["data"]["fixed_length"] or 0)
    kept = 1.0
    if n_fixed:
        if dicts is not None:
            extra = 2 if dicts.cls_id is not None else 0
        else:
            extra = 2 if cfg["pretrain"].get("cls_token", False) else 0
        keep = lengths - extra >= n_fixed
        kept = float(keep.mean()) if len(keep) else 1.0  # cells with fewer genes are dropped
        lengths = np.full(int(keep.sum()), n_fixed + extra, dtype=np.int64)
        lists = [x for x, k in zip(lists, keep) if k]
    n_labels = max((len(v) for v in sel.names.values()), default=2)
    model = P.timing_model(config, n_labels, seed)
    shape = P.build_shape(
        cfg,
        n_obs=n_obs,
        split=split,
        lengths=lengths,
        token_lists=lists,
        special_ids=sorted(getattr(dicts, "special_ids", ()) or ()) if dicts is not None else (),
        n_layers=int(config.num_hidden_layers),
        de_comparisons=de_comparisons(cfg, sel),
        pretrain_cells=pretrain_cells,
        data_cached=data_cached,
        tokenization_cached=False,
        permuted=PERMUTED,
    )
    if kept < 1.0:
        shape.split = {k: int(round(v * kept)) for k, v in shape.split.items()}
        shape.n_selected = sum(shape.split.values())
    device = resolve_device(cfg["compute"]["device"])
    plan = P.make_plan(
        cfg,
        shape,
        model,
        device=device,
        dicts=dicts,
        extra={"source": source, "input_size": int(max_len), "sampled_cells": int(len(rows))},
        say=say,
    )
    plan["planning_s"] = time.perf_counter() - t0
    return plan
