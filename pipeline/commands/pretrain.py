"""`gfattn pretrain`: masked-gene pretraining of a small Geneformer-style BERT on a raw-count corpus.

Builds the corpus vocabulary (token ids and gene medians), rank-value encodes the cells and pretrains
(`pipeline.models.pretrain`), writing a directory that looks like a Geneformer checkpoint.

`gfattn pretrain --embedded --out DIR` builds a preset's embedded model instead (`pipeline.models.embedded`:
its synthetic corpus, vocabulary and pretraining, with the preset's CPU threads) and says whether it
equals the model shipped with gfattn bit for bit (`--check`: exit 1 when it does not).
"""

from __future__ import annotations

import argparse

from pipeline.paths import add_store_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", metavar="FILE.h5ad", help="raw-count AnnData to pretrain on")
    p.add_argument(
        "--embedded",
        action="store_true",
        help="build a preset's embedded model (its [pretrain] recipe on the synthetic corpus) instead of --corpus",
    )
    p.add_argument("--preset", default="default", help="with --embedded: whose recipe (default: default)")
    p.add_argument(
        "--check", action="store_true", help="with --embedded: exit 1 unless the model equals the shipped one"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    p.add_argument("--layers", type=int, default=2, help="encoder layers (default 2)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--intermediate", type=int, default=256, help="feed-forward size (default 256)")
    p.add_argument("--max-len", type=int, default=256, help="input size: top ranks kept per cell (default 256)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the corpus (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="cells per step (default 32)")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (default 5e-3)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="stop training after this many seconds, annealing the learning rate to fit (0 = none)",
    )
    p.add_argument(
        "--cell-loss-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="weight of the cell-level objective: the first position predicts its cell's genes (default 0: off)",
    )
    p.add_argument("--min-cells", type=int, default=1, help="vocabulary: genes detected in at least this many cells")
    p.add_argument(
        "--seed", type=int, default=None, help="seed for everything (default 0; --embedded: the preset's model seed)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device")
    p.add_argument("--name", help="run name (default: pretrain:<out dir name>)")
    add_store_argument(p)


def run(args) -> int:
    from contextlib import closing, nullcontext
    from pathlib import Path

    from pipeline.errors import InputError
    from pipeline.paths import open_store

    if args.embedded:
        return _embedded(args)
    if not args.corpus:
        raise InputError("pass --corpus FILE.h5ad (a raw-count corpus), or --embedded for a preset's embedded model")
    if args.seed is None:
        args.seed = 0
    corpus_path = Path(args.corpus)
    if not corpus_path.is_file():
        raise InputError(f"corpus {corpus_path} does not exist; pass a raw-count .h5ad to --corpus")
    out = Path(args.out)
    if (out / "config.json").exists():
        raise InputError(f"{out} already holds a model (config.json); choose a new --out directory")

    from pipeline.models.pretrain import pretrain
    from pipeline.tokenize.encode import build_vocabulary, tokenize_anndata

    store = open_store(args.store)
    run_id = None
    hyper = {
        k: getattr(args, k)
        for k in (
            "layers",
            "hidden",
            "heads",
            "intermediate",
            "max_len",
            "epochs",
            "batch_size",
            "lr",
            "time_budget",
            "min_cells",
            "seed",
        )
    }
    if store is not None:
        run_id = store.create_run(
            args.name or f"pretrain:{out.name}",
            "pretrain",
            {"corpus": str(corpus_path), **hyper},
            data_path=str(corpus_path),
            model_path=str(out),
            device=args.device,
        )
    tracking = store.track(run_id) if store is not None else nullcontext()
    from pipeline.progress import Reporter

    rep = Reporter()  # the terminal only: `pretrain` records its progress in the store itself
    with tracking, closing(rep):
        if store is not None:
            store.set_stage(run_id, "vocabulary", "running")
        dicts = build_vocabulary(str(corpus_path), min_cells=args.min_cells)
        corpus_ds, _ = tokenize_anndata(str(corpus_path), dicts, max_len=args.max_len)
        if store is not None:
            store.set_stage(run_id, "vocabulary", "completed")
            store.set_stage(run_id, "pretrain", "running")
        metrics = pretrain(
            corpus_ds,
            dicts,
            out,
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            intermediate=args.intermediate,
            max_len=args.max_len,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            time_budget_s=args.time_budget or None,
            cell_loss_weight=args.cell_loss_weight,
            progress=rep.callback("steps", stage="pretrain"),
            device=args.device,
            store=store,
            run_id=run_id,
        )
        if store is not None:
            store.set_stage(run_id, "pretrain", "completed")
    print(f"model written to {out}")
    print(
        f"held-out masked-gene accuracy {metrics['heldout_accuracy']:.4f} (top-5 {metrics['heldout_top5_accuracy']:.4f}); "
        f"chance (most frequent gene) {metrics['chance_accuracy']:.4f}, rank-aware frequency "
        f"{metrics['position_baseline_accuracy']:.4f}; {metrics['steps']} steps in {metrics['train_seconds']:.0f} s"
    )
    if run_id is not None:
        print(f"run {run_id}")
    return 0


def _embedded(args) -> int:
    """Build a preset's embedded model into --out and compare it with the shipped one."""
    from contextlib import closing
    from pathlib import Path

    from pipeline import config
    from pipeline.errors import InputError
    from pipeline.io import sha256_file
    from pipeline.models import embedded
    from pipeline.progress import Reporter

    if args.preset not in config.PRESETS:
        raise InputError(f"--preset {args.preset!r}: use one of {', '.join(config.PRESETS)}")
    out = Path(args.out)
    if out.exists():
        raise InputError(f"{out} already exists; choose a new --out directory")
    cfg = config.resolve(args.preset)
    pcfg = dict(cfg["pretrain"])
    seed = embedded.model_seed(pcfg, 0) if args.seed is None else int(args.seed)
    preset = cfg["data"]["synth_preset"]
    threads = int(cfg["compute"]["threads"] or 1)
    rep = Reporter()
    with closing(rep):
        metrics = embedded.build_embedded(
            pcfg,
            preset,
            seed,
            out,
            device="cpu" if args.device == "auto" else args.device,
            threads=threads,
            progress=rep.callback("steps", stage="pretrain"),
            config_preset=args.preset,
        )
    key = embedded.recipe_key(embedded.recipe(pcfg, preset, seed))
    print(
        f"embedded model of preset {args.preset!r} (recipe {key}, seed {seed}, {threads} CPU thread(s)) written to {out}"
    )
    print(
        f"held-out masked-gene accuracy {metrics['heldout_accuracy']:.4f}; {metrics['steps']} steps in "
        f"{metrics['train_seconds']:.0f} s; weights sha256 {sha256_file(out / 'model.safetensors')}"
    )
    if embedded.shipped_model(key) is None:
        print("gfattn ships no model of this recipe")
        return 1 if args.check else 0
    diff = embedded.rebuilt_differences(out)
    if diff:
        print(f"differs from the shipped model ({embedded.SHIPPED_DIR}) in {', '.join(diff)}")
        return 1 if args.check else 0
    print(f"identical, bit for bit, to the shipped model ({embedded.SHIPPED_DIR})")
    return 0
