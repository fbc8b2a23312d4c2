"""The thesis experiment end to end (DESIGN.md, "Data flow of one `gfattn pipeline` run").

data -> model -> tokenize -> fine-tune (task x mode) -> DE -> attention (task x model pair) -> summary.
Every stage reports to the store; a pipeline run owns one child run per data set, fine-tuning and
analysis. Expensive products are cached next to the store: the synthetic data and the embedded
model by their configuration, tokenizations by data content hash + dictionaries + options, fine-tuned
models by run, so `--resume` continues a failed or interrupted run from its first unfinished stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.paths import cache_dir_for_store
from pipeline.progress import Reporter


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but no CUDA GPU is visible; use --device cpu or auto")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def preflight(cfg: dict) -> None:
    """Checks that need no heavy work, done before a run is recorded: paths exist and look right."""
    data_path = cfg["data"]["path"]
    if data_path:
        p = Path(data_path)
        if not p.is_file():
            raise InputError(f"data file {p} does not exist; pass an .h5ad with raw counts to --data")
        if p.suffix != ".h5ad":
            raise InputError(f"data file {p} is not an .h5ad file; convert it with anndata (`adata.write_h5ad`)")
    model_path = cfg["model"]["path"]
    if data_path and not model_path:
        raise InputError(
            f"--data {data_path} needs --model DIR (a Geneformer checkpoint): the embedded model only knows the"
            " synthetic data's genes"
        )
    if model_path:
        m = Path(model_path)
        if not m.is_dir():
            raise InputError(f"model directory {m} does not exist; pass a local Hugging Face checkpoint dir to --model")
        if not (m / "config.json").is_file():
            raise InputError(f"model directory {m} has no config.json; is it a Hugging Face checkpoint?")
        if not any((m / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
            raise InputError(f"model directory {m} has no weights (model.safetensors or pytorch_model.bin)")
    gdir = cfg["model"]["geneformer_dir"]
    if gdir and not Path(gdir).is_dir():
        raise InputError(f"Geneformer dictionary directory {gdir} does not exist (--geneformer-dir)")
    ref = cfg["analysis"]["reference_set"]
    if ref and not Path(ref).is_file():
        raise InputError(f"reference gene set {ref} does not exist (analysis.reference_set)")
    resolve_device(cfg["compute"]["device"])
    if model_path:
        model_input_size(Path(model_path), _dictionaries_for(Path(model_path), cfg), cfg["model"]["max_len"])
    if data_path:
        from pipeline.design import select_cells, stratified_split

        sel = select_cells(read_obs(data_path), cfg)
        stratified_split(sel.dose_names, cfg["split"]["validation"], cfg["split"]["test"], int(cfg["run"]["seed"]))


def read_obs(data_path: str):
    """The obs table of an .h5ad without loading X."""
    import anndata as ad

    try:
        backed = ad.read_h5ad(data_path, backed="r")
    except Exception as exc:  # unreadable HDF5 or not an AnnData
        raise InputError(f"cannot read {data_path} as .h5ad ({type(exc).__name__}: {exc}); is the file complete?") from None
    try:
        return backed.obs.copy()
    finally:
        backed.file.close()


@dataclass
class Context:
    cfg: dict
    store: object
    run_id: int
    rep: Reporter
    cache: Path
    device: str
    out: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.cfg["run"]["seed"])

    def completed_child(self, name: str, kind: str) -> int | None:
        """The id of a completed child run of this name (when resuming), else None; stale ones are removed."""
        found = None
        for c in self.store.children(self.run_id):
            if c["name"] == name and c["kind"] == kind:
                if c["status"] == "completed" and found is None:
                    found = c["id"]
                else:
                    self.store.delete_run(c["id"])
        return found

    def new_child(self, name: str, kind: str, config: dict | None = None, **kw) -> int:
        return self.store.create_run(name, kind, config or {}, parent_id=self.run_id, device=self.device, **kw)


# --------------------------------------------------------------------------------------------- data
def stage_data(ctx: Context) -> None:
    """Load (or synthesise) the data, select the cells of the design, label, split, QC, UMAP."""
    cfg = ctx.cfg
    data_path = cfg["data"]["path"]
    if not data_path:
        data_path = str(synthetic_data_path(ctx))
    ctx.out["data_path"] = data_path
    ctx.rep.line(f"data: {data_path}")
    obs = read_obs(data_path)

    from pipeline.design import select_cells, stratified_split

    sel = select_cells(obs, cfg)
    split = stratified_split(sel.dose_names, cfg["split"]["validation"], cfg["split"]["test"], ctx.seed)
    ctx.out["selection"] = sel
    ctx.out["split"] = split
    ctx.rep.line(
        f"{len(sel.index)} cells selected of {len(obs)}: "
        + ", ".join(f"{k} {v}" for k, v in sel.counts_after.items())
        + f"; split train {int((split == 'train').sum())} / validation {int((split == 'validation').sum())}"
        f" / test {int((split == 'test').sum())}"
    )


def synthetic_data_path(ctx: Context) -> Path:
    """The embedded default's data set, generated once per configuration and cached."""
    from pipeline.commands.synth import write_h5ad_atomic
    from pipeline.synth import make_sciplex_like

    d = ctx.cfg["data"]
    params = {"scale": d["synth_scale"], "preset": d["synth_preset"], "length_effect": d["synth_length_effect"],
              "seed": ctx.seed, "v": 1}
    path = ctx.cache / "data" / f"sciplex-like-{_digest(params)}.h5ad"
    if not path.is_file():
        ctx.rep.line(f"generating synthetic sci-Plex-like data (scale {d['synth_scale']}, preset {d['synth_preset']})")
        adata = make_sciplex_like(scale=d["synth_scale"], preset=d["synth_preset"],
                                  length_effect=d["synth_length_effect"], seed=ctx.seed)
        write_h5ad_atomic(adata, path)
    return path


def stage_record_data(ctx: Context) -> None:
    """The data child run: what the experiment saw (cells per dose, lengths per class, UMAP)."""
    import pandas as pd

    sel, split, ds = ctx.out["selection"], ctx.out["split"], ctx.out["dataset"]
    if ctx.completed_child("data", "data") is not None:
        ctx.rep.line("data record already complete (resumed)")
        return
    child = ctx.new_child("data", "data", {"data": ctx.cfg["data"], "labels": ctx.cfg["labels"]},
                          data_path=ctx.out["data_path"], data_hash=ctx.out.get("data_hash"))
    with ctx.store.track(child):
        lengths = np.asarray(ds["length"], dtype=np.int64)
        cells = pd.DataFrame({
            "cell_id": sel.cell_ids,
            "dose": sel.dose,
            "dose_class": sel.dose_names,
            "group": sel.group,
            "length": lengths,
            "split": split,
        })
        if ctx.cfg["data"]["umap"]:
            ctx.rep.line("UMAP of the selected cells (scanpy)")
            coords = compute_umap(ctx.out["data_path"], sel, ctx.seed)
            cells["umap1"], cells["umap2"] = coords[:, 0], coords[:, 1]
        ctx.store.put_cells(child, cells)
        for task in ctx.cfg["labels"]["tasks"]:
            ctx.store.put_labels(child, task, sel.labels(task)[1])
        ctx.store.put_split(child, list(sel.cell_ids), list(split))
        per_class = {}
        for name in sel.labels("dose")[1]:
            ln = lengths[cells["dose_class"].to_numpy() == name]
            per_class[name] = _length_summary(ln)
        for g in ("low", "high"):
            ln = lengths[sel.group == g]
            if len(ln):
                per_class[g] = _length_summary(ln)
        hist, edges = np.histogram(lengths, bins=min(50, max(5, int(lengths.max() - lengths.min() + 1))))
        ctx.store.put_vector(child, "length_hist", hist.astype(np.float32),
                             meta={"edges": edges.tolist(), "median": float(np.median(lengths))})
        ctx.store.put_json(child, "qc_report", {
            "cells_per_dose_before": sel.counts_before,
            "cells_per_dose_after": sel.counts_after,
            "cells_per_group": {g: int((sel.group == g).sum()) for g in ("low", "high")},
            "split": {s: int((split == s).sum()) for s in ("train", "validation", "test")},
            "length_per_class": per_class,
            "tokenize": ctx.out.get("tokenize_report", {}),
        })


def _length_summary(lengths: np.ndarray) -> dict:
    return {"n": int(len(lengths)), "median": float(np.median(lengths)), "mean": float(np.mean(lengths)),
            "min": int(lengths.min()), "max": int(lengths.max()),
            "q25": float(np.percentile(lengths, 25)), "q75": float(np.percentile(lengths, 75))}


def compute_umap(data_path: str, sel, seed: int) -> np.ndarray:
    """UMAP of the selected cells with scanpy's standard recipe (normalise, log1p, HVG, PCA, kNN)."""
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(data_path)[sel.index].copy()
    sc.pp.filter_genes(adata, min_cells=3)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    n_top = min(2000, adata.n_vars)
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top, subset=True)
    sc.pp.pca(adata, n_comps=min(30, adata.n_obs - 1, adata.n_vars - 1), random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=15, random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    return np.asarray(adata.obsm["X_umap"], dtype=np.float64)


# -------------------------------------------------------------------------------------------- model
def stage_model(ctx: Context) -> None:
    """The checkpoint and its dictionaries: the user's, or the embedded model (pretrained once, cached)."""
    from pipeline.dictionaries import GeneDictionaries

    cfg = ctx.cfg
    if cfg["model"]["path"]:
        model_dir = Path(cfg["model"]["path"])
        dicts = _dictionaries_for(model_dir, cfg)
    else:
        model_dir = embedded_model_dir(ctx)
        dicts = GeneDictionaries.from_model_dir(model_dir)
    ctx.out["max_len"] = model_input_size(model_dir, dicts, cfg["model"]["max_len"])
    ctx.out["model_dir"] = model_dir
    ctx.out["dicts"] = dicts
    from pipeline.model import weight_file
    from pipeline.tokenize import hash_file

    weights = weight_file(model_dir)
    ctx.store.set_inputs(ctx.run_id, model_path=model_dir, model_hash=hash_file(weights) if weights else None)
    ctx.rep.line(f"model {model_dir} ({dicts.version}, {len(dicts.token_dict)} tokens, input size {ctx.out['max_len']})")


def model_input_size(model_dir: Path, dicts, requested: int = 0) -> int:
    """The encoding length for a model: its input size, or fewer ranks if asked; refuses a vocabulary mismatch."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    vocab, n_tokens = int(config["vocab_size"]), len(dicts.token_dict)
    if vocab != n_tokens:
        raise InputError(
            f"model {model_dir} has vocab_size {vocab} but the token dictionary has {n_tokens} tokens;"
            f" use the dictionaries the model was trained with (--geneformer-dir, V1 = gc30M, V2 = gc104M)"
        )
    size = int(config["max_position_embeddings"])
    if requested and requested > size:
        raise InputError(f"model.max_len {requested} exceeds the input size {size} of model {model_dir}")
    return int(requested or size)


def _dictionaries_for(model_dir: Path, cfg: dict):
    from pipeline.dictionaries import GeneDictionaries

    version = cfg["model"]["version"]
    if any(model_dir.glob("token_dictionary*.pkl")):
        return GeneDictionaries.from_model_dir(model_dir)
    gdir = cfg["model"]["geneformer_dir"]
    if not gdir:
        raise InputError(
            f"model directory {model_dir} carries no gene dictionaries; pass --geneformer-dir with a Geneformer"
            " checkout's dictionaries (token_dictionary_gc104M.pkl, gene_dictionaries_30m/)"
        )
    if version == "auto":
        version = _guess_version(model_dir)
    return GeneDictionaries.from_geneformer_dir(gdir, version)


def _guess_version(model_dir: Path) -> str:
    """V1 models take 2048 tokens over the gc30M vocabulary; V2 take 4096 over gc104M."""
    config = json.loads((model_dir / "config.json").read_text())
    return "V1" if int(config.get("max_position_embeddings", 2048)) <= 2048 else "V2"


def embedded_model_dir(ctx: Context) -> Path:
    """Pretrain the embedded default's model on the synthetic healthy corpus, once per configuration."""
    pcfg = dict(ctx.cfg["pretrain"])
    preset = ctx.cfg["data"]["synth_preset"]
    key = _digest({"pretrain": pcfg, "preset": preset, "seed": ctx.seed, "v": 2})
    out = ctx.cache / "models" / f"embedded-{key}"
    if (out / "config.json").is_file():
        ctx.rep.line(f"embedded model cached at {out}")
        return out
    import anndata  # noqa: F401  (fail early with a clear import error)

    from pipeline.pretrain import pretrain
    from pipeline.synth import make_corpus
    from pipeline.tokenize import build_vocabulary, tokenize_anndata

    ctx.rep.line(f"pretraining the embedded model on a synthetic corpus of {pcfg['corpus_cells']} cells")
    # the corpus shares the synthetic data's gene universe, so the vocabulary covers the data
    corpus = make_corpus(n_cells=int(pcfg["corpus_cells"]), seed=ctx.seed + 1, preset=preset)
    dicts = build_vocabulary(corpus)
    corpus_ds, _ = tokenize_anndata(corpus, dicts, max_len=int(pcfg["max_len"]))
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        metrics = pretrain(
            corpus_ds, dicts, tmp,
            layers=int(pcfg["layers"]), hidden=int(pcfg["hidden"]), heads=int(pcfg["heads"]),
            intermediate=int(pcfg["intermediate"]), max_len=int(pcfg["max_len"]), epochs=int(pcfg["epochs"]),
            batch_size=int(pcfg["batch_size"]), lr=float(pcfg["lr"]), seed=ctx.seed,
            time_budget_s=float(pcfg["time_budget_s"]) or None, device=ctx.device,
            progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="steps", **kw),
        )
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ctx.rep.line("embedded model: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in metrics.items()))
    return out


# ----------------------------------------------------------------------------------------- tokenize
def stage_tokenize(ctx: Context) -> None:
    """Rank-value encode the selected cells (cached by data content hash, dictionaries and options)."""
    import datasets
    import anndata as ad

    from pipeline.tokenize import hash_file, tokenize_anndata

    cfg, sel, dicts = ctx.cfg, ctx.out["selection"], ctx.out["dicts"]
    data_hash = hash_file(ctx.out["data_path"])
    ctx.out["data_hash"] = data_hash
    ctx.store.set_inputs(ctx.run_id, data_path=ctx.out["data_path"], data_hash=data_hash)
    key = _digest({
        "data": data_hash, "cells": hashlib.sha256("\n".join(sel.cell_ids).encode()).hexdigest(),
        "tokens": _digest(sorted(dicts.token_dict.items())), "medians": _digest(sorted(dicts.gene_median.items())),
        "max_len": ctx.out["max_len"], "version": dicts.version,
        "columns": [cfg["data"][k] for k in ("gene_id_column", "n_counts_column", "layer")], "v": 1,
    })
    path = ctx.cache / "tokenized" / key
    report_path = path / "gfattn_tokenize_report.json"
    if report_path.is_file():
        ds = datasets.load_from_disk(str(path))
        report = json.loads(report_path.read_text())
        ctx.rep.line(f"tokenization cached at {path}")
    else:
        adata = ad.read_h5ad(ctx.out["data_path"])[sel.index].copy()
        ds, rep = tokenize_anndata(
            adata, dicts, max_len=ctx.out["max_len"],
            n_counts_column=cfg["data"]["n_counts_column"] or None,
            gene_id_column=cfg["data"]["gene_id_column"] or None,
            layer=cfg["data"]["layer"] or None,
        )
        report = rep.to_dict() if hasattr(rep, "to_dict") else dict(vars(rep))
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ds.save_to_disk(str(tmp))
        (tmp / "gfattn_tokenize_report.json").write_text(json.dumps(report, default=str, indent=1))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        ds = datasets.load_from_disk(str(path))
    ids = list(ds["cell_id"])
    if len(ids) != len(sel.cell_ids):
        # cells dropped by the tokenizer (zero counts, filter_pass): keep the selection in step
        keep = np.isin(sel.cell_ids, ids)
        ctx.rep.line(f"{int((~keep).sum())} selected cells dropped by tokenization (see the QC report)")
        _restrict_selection(ctx, keep)
    order = {c: i for i, c in enumerate(ids)}
    ds = ds.select([order[c] for c in ctx.out["selection"].cell_ids])
    ctx.out["dataset"] = ds
    ctx.out["tokenize_report"] = report
    lengths = np.asarray(ds["length"])
    ctx.rep.line(f"tokenized {len(ds)} cells: length median {np.median(lengths):.0f}, max {lengths.max()}")


def _restrict_selection(ctx: Context, keep: np.ndarray) -> None:
    from dataclasses import replace

    sel = ctx.out["selection"]
    ctx.out["selection"] = replace(sel, index=sel.index[keep], cell_ids=sel.cell_ids[keep], dose=sel.dose[keep],
                                   group=sel.group[keep])
    ctx.out["split"] = ctx.out["split"][keep]


def task_datasets(ctx: Context, task: str):
    """train / validation / test datasets of one task, with an integer `label` column."""
    ds, split, sel = ctx.out["dataset"], ctx.out["split"], ctx.out["selection"]
    labels, names = sel.labels(task)
    ds = ds.remove_columns([c for c in ("label", "group_name") if c in ds.column_names])
    ds = ds.add_column("label", labels.tolist()).add_column("group_name", [str(g) for g in sel.group])
    parts = {s: ds.select(np.flatnonzero(split == s).tolist()) for s in ("train", "validation", "test")}
    return parts, names


# ----------------------------------------------------------------------------------------- finetune
def model_out_dir(ctx: Context, task: str, mode: str) -> Path:
    return ctx.cache / "runs" / str(ctx.run_id) / f"{task}__{mode}"


def stage_finetune(ctx: Context, task: str, mode: str) -> None:
    """Fine-tune one (task, mode) and record metrics, confusion and the best model (thesis 2.3, 4.1)."""
    name = f"{task}/{mode}"
    out_dir = model_out_dir(ctx, task, mode)
    done = ctx.completed_child(name, "finetune")
    if done is not None and (out_dir / "config.json").is_file():
        ctx.rep.line(f"{name}: already fine-tuned (resumed)")
        ctx.out.setdefault("models", {})[(task, mode)] = out_dir
        return
    from pipeline.model import load_classifier
    from pipeline.train import TrainConfig, finetune

    parts, names = task_datasets(ctx, task)
    t = ctx.cfg["train"]
    tc = TrainConfig(
        lr=float(t["lr"]) if not (mode == "frozen" and t["head_lr"]) else float(t["head_lr"]),
        weight_decay=float(t["weight_decay"]), warmup_ratio=float(t["warmup_ratio"]), epochs=int(t["epochs"]),
        batch_size=int(t["batch_size"]), grad_accum=int(t["grad_accum"]), class_weights=bool(t["class_weights"]),
        seed=ctx.seed, device=ctx.device, amp=t["amp"], max_len=ctx.out["max_len"],
    )
    child = ctx.new_child(name, "finetune", {"task": task, "mode": mode, "labels": names, "train": t},
                          model_path=str(ctx.out["model_dir"]))
    with ctx.store.track(child):
        ctx.store.put_labels(child, task, names)
        nproc = int(ctx.cfg["compute"]["nproc"])
        if nproc > 1:
            from pipeline.distributed import finetune_distributed

            result = finetune_distributed(
                ctx.out["model_dir"], parts, label_names=names, mode=mode, config=tc, nproc=nproc,
                store_path=str(ctx.store.path), run_id=child, out_dir=out_dir, dicts=ctx.out["dicts"],
            )
        else:
            model = load_classifier(ctx.out["model_dir"], len(names), dicts=ctx.out["dicts"],
                                    max_len=ctx.out["max_len"])
            result = finetune(
                model, parts["train"], parts["validation"], parts["test"], label_names=names, mode=mode,
                config=tc, store=ctx.store, run_id=child, out_dir=out_dir,
                progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="steps", **kw),
            )
        acc, f1 = result.test_metrics["accuracy"], result.test_metrics["macro_f1"]
        ctx.rep.line(f"{name}: test accuracy {acc:.3f}, macro-F1 {f1:.3f} (best epoch {result.best_epoch})")
    ctx.out.setdefault("models", {})[(task, mode)] = out_dir


# --------------------------------------------------------------------------------------- DE
def stage_de(ctx: Context) -> None:
    """scanpy's Wilcoxon between the high and low dose groups on the selected cells (thesis fig. 7)."""
    if ctx.completed_child("de: high vs low", "de") is not None:
        ctx.rep.line("DE already computed (resumed)")
        done = ctx.completed_child("de: high vs low", "de")
        ctx.out["de"] = ctx.store.gene_table_df(done, "de")
        return
    from pipeline.analysis import de_wilcoxon

    sel = ctx.out["selection"]
    adata = ensembl_indexed(ctx.out["data_path"], sel.index, ctx.out["dicts"], ctx.cfg["data"]["gene_id_column"] or None)
    adata.obs["group"] = sel.group
    child = ctx.new_child("de: high vs low", "de", {"groupby": "group", "group": "high", "reference": "low"})
    with ctx.store.track(child):
        de = de_wilcoxon(adata, "group", "high", "low")
        symbols = ctx.out["dicts"].id_to_symbol
        if "symbol" not in de.columns:
            de.insert(1, "symbol", [symbols.get(g, "") for g in de["ensembl_id"]])
        ctx.store.put_gene_table(child, "de", de)
    ctx.out["de"] = de
    ctx.rep.line("top DE genes (high vs low): " + ", ".join(map(str, de["symbol"].head(10))))


def ensembl_indexed(data_path: str, index: np.ndarray, dicts, gene_id_column: str | None):
    """The selected cells with var indexed by vocabulary Ensembl IDs (unmapped genes dropped, first of duplicates kept)."""
    import anndata as ad

    from pipeline.data import map_genes

    adata = ad.read_h5ad(data_path)[index].copy()
    mapping = map_genes(adata.var, dicts, gene_id_column, source=data_path)
    ids = np.asarray([g if g is not None else "" for g in mapping.ensembl_ids], dtype=object)
    keep = ids != ""
    keep &= ~pd_duplicated(ids)
    adata = adata[:, keep].copy()
    adata.var_names = ids[keep].astype(str)
    return adata


def pd_duplicated(values: np.ndarray) -> np.ndarray:
    import pandas as pd

    return pd.Series(values).duplicated().to_numpy()


# --------------------------------------------------------------------------------------- attention
def stage_attention(ctx: Context, task: str, mode_a: str, mode_b: str) -> None:
    """Weight- and norm-based attention of two fine-tuned models on the test cells (thesis 3.3-4.5)."""
    name = f"{task}: {mode_a} vs {mode_b}"
    if ctx.completed_child(name, "analysis") is not None:
        ctx.rep.line(f"{name}: already analysed (resumed)")
        return
    import torch

    from pipeline.analysis import run_pair_analysis
    from pipeline.model import load_for_attention

    a_cfg = ctx.cfg["analysis"]
    parts, names = task_datasets(ctx, task)
    test = parts["test"]
    if a_cfg["max_cells"] and len(test) > a_cfg["max_cells"]:
        rng = np.random.default_rng(ctx.seed)
        test = test.select(sorted(rng.choice(len(test), int(a_cfg["max_cells"]), replace=False).tolist()))
    models = ctx.out["models"]
    child = ctx.new_child(name, "analysis", {"task": task, "model_a": mode_a, "model_b": mode_b,
                                             "analysis": a_cfg, "cells": len(test)})
    with ctx.store.track(child):
        model_a = load_for_attention(models[(task, mode_a)])
        model_b = load_for_attention(models[(task, mode_b)])
        run_pair_analysis(
            ctx.store, child, model_a, model_b, test,
            dicts=ctx.out["dicts"], names=(mode_a, mode_b), group_column="group_name",
            de=ctx.out.get("de"), reference_set=a_cfg["reference_set"] or None, top_k=a_cfg["top_k"],
            n_boot=int(a_cfg["n_boot"]), batch_size=int(a_cfg["batch_size"]), device=ctx.device,
            dtype=torch.float32, seed=ctx.seed,
            progress=lambda done, total, **kw: ctx.rep.update(done, total, unit="cells", **kw),
        )
        del model_a, model_b
    ctx.rep.line(f"{name}: analysed {len(test)} test cells")


# ----------------------------------------------------------------------------------------- driver
def _stages(ctx: Context) -> None:
    cfg, rep = ctx.cfg, ctx.rep
    with rep.stage("data"):
        stage_data(ctx)
    with rep.stage("model"):
        stage_model(ctx)
    with rep.stage("tokenize"):
        stage_tokenize(ctx)
    with rep.stage("record"):
        stage_record_data(ctx)
    for task in cfg["labels"]["tasks"]:
        for mode in cfg["train"]["modes"]:
            with rep.stage(f"finetune {task}/{mode}"):
                stage_finetune(ctx, task, mode)
    if cfg["analysis"]["de"] and "lowhigh" in cfg["labels"]["tasks"]:
        with rep.stage("de"):
            stage_de(ctx)
    else:
        rep.skip("de", "analysis.de is off or the lowhigh task is not run")
    for task in cfg["analysis"]["tasks"]:
        for mode_a, mode_b in cfg["analysis"]["pairs"]:
            with rep.stage(f"attention {task}: {mode_a} vs {mode_b}"):
                stage_attention(ctx, task, mode_a, mode_b)


def run_pipeline(cfg: dict, store_path, *, resume_id: int | None = None, stdout=None) -> int:
    """Run (or resume) the experiment; returns the exit code (0 done, 1 failed, 2 bad input, 130 interrupted)."""
    import sys

    from store import Store

    stdout = stdout or sys.stdout
    preflight(cfg)
    device = resolve_device(cfg["compute"]["device"])
    if cfg["compute"]["threads"]:
        import torch

        torch.set_num_threads(int(cfg["compute"]["threads"]))
    store = Store(store_path)
    name = cfg["run"]["name"] or f"{cfg['run']['preset']} {time.strftime('%Y-%m-%d %H:%M')}"
    if resume_id is None:
        run_id = store.create_run(name, "pipeline", cfg, data_path=cfg["data"]["path"] or None,
                                  model_path=cfg["model"]["path"] or None, device=device,
                                  tags=[cfg["run"]["preset"]])
    else:
        run_id = resume_id
        store.reopen_run(run_id)
    rep = Reporter(store, run_id)
    ctx = Context(cfg=cfg, store=store, run_id=run_id, rep=rep, cache=cache_dir_for_store(store_path), device=device)
    rep.line(f"run {run_id} '{name}' in store {Path(store_path).resolve()} on {device}")
    t0 = time.monotonic()
    try:
        with store.track(run_id):
            _stages(ctx)
    except InputError:
        raise
    except KeyboardInterrupt:
        rep.close()
        print(f"run {run_id} interrupted; continue it with `gfattn pipeline --resume {run_id}`", file=sys.stderr)
        return 130
    except Exception as exc:
        rep.close()
        print(f"run {run_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"continue it with `gfattn pipeline --resume {run_id}` once fixed", file=sys.stderr)
        if os.environ.get("GFATTN_TRACEBACK"):
            raise
        return 1
    finally:
        rep.close()
    from pipeline.summary import format_summary

    print(format_summary(store, run_id, elapsed_s=time.monotonic() - t0), file=stdout)
    return 0


def resume_pipeline(ref: str, store_path) -> int:
    from store import Store

    store = Store(store_path)
    try:
        run_id = store.resolve_run(ref)
    except Exception as exc:
        raise InputError(f"no run {ref!r} in store {store_path}: {exc}") from None
    run = store.get_run(run_id)
    if run["kind"] != "pipeline":
        raise InputError(f"run {ref} is a {run['kind']} run; --resume takes a pipeline run")
    if run["status"] == "completed":
        raise InputError(f"run {ref} already completed; start a new run instead")
    if run["status"] == "running":
        raise InputError(f"run {ref} is still running (pid {run.get('pid')} on {run.get('host')})")
    return run_pipeline(run["config"], store_path, resume_id=run_id)
