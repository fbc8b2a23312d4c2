"""`gfattn finetune`: fine-tune a checkpoint on a tokenized dataset in one training mode (thesis 2.3, 4.1).

Labels come from a dataset column; cells are split into train / validation / test stratified by label
(seeded, recorded in the store). With `--nproc N > 1` the training runs in N processes under torchrun.
"""

from __future__ import annotations

import argparse

from pipeline.paths import add_store_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="TOKENIZED_DIR", help="tokenized dataset (`gfattn tokenize`)")
    p.add_argument("--model", required=True, metavar="DIR", help="Geneformer or gfattn checkpoint directory")
    p.add_argument("--label-column", required=True, metavar="COL", help="dataset column holding the class labels")
    p.add_argument(
        "--mode",
        default="frozen",
        help="frozen (linear probe), unfrozen, last-K (e.g. last-1) or freeze-N (default frozen)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where the fine-tuned model is saved")
    p.add_argument("--epochs", type=int, default=5, help="epochs (default 5, as in the thesis)")
    p.add_argument("--batch-size", type=int, default=12, help="cells per step and process (default 12)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    p.add_argument("--weight-decay", type=float, default=0.001, help="AdamW weight decay (default 0.001)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps of warm-up (default 0.1)")
    p.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    p.add_argument("--max-len", type=int, default=0, help="keep each cell's top N tokens (0 = all)")
    p.add_argument("--validation", type=float, default=0.15, help="validation fraction (default 0.15)")
    p.add_argument("--test", type=float, default=0.15, help="test fraction (default 0.15)")
    p.add_argument(
        "--geneformer-dir",
        metavar="DIR",
        help="Geneformer dictionaries, when the model directory carries none (checks the vocabulary)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the split, the head and training (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="autocast on CUDA")
    p.add_argument("--nproc", type=int, default=1, help="processes for data-parallel training (torchrun)")
    p.add_argument("--name", help="run name (default: <label column>/<mode>)")
    add_store_argument(p)


def _label_names(values) -> tuple[list[str], object]:
    """Sorted label names (numerically when every value is a number) and each cell's label index."""
    import numpy as np

    raw = [str(v) for v in values]
    uniq = sorted(set(raw))
    try:
        uniq = sorted(uniq, key=float)
    except ValueError:
        pass
    index = {v: i for i, v in enumerate(uniq)}
    return uniq, np.array([index[v] for v in raw], dtype=np.int64)


def _dictionaries(model_dir, geneformer_dir):

    from pipeline.models.load import model_dictionaries

    dicts = model_dictionaries(model_dir)
    if dicts is None and geneformer_dir:
        from pipeline.data.dictionaries import GeneDictionaries, resolve_version

        dicts = GeneDictionaries.from_geneformer_dir(geneformer_dir, resolve_version("auto", model_dir))
    return dicts


def run(args) -> int:
    import contextlib
    from pathlib import Path

    from pipeline.config import parse_mode
    from pipeline.errors import InputError

    parse_mode(args.mode)
    if args.nproc < 1:
        raise InputError(f"--nproc must be at least 1, got {args.nproc}")
    fractions = (1.0 - args.validation - args.test, args.validation, args.test)
    if not (0 < args.validation < 1 and 0 < args.test < 1 and fractions[0] >= 0.1):
        raise InputError("--validation and --test must be in (0, 1) and leave at least 10% of cells for training")

    import numpy as np

    from pipeline.data.design import stratified_split
    from pipeline.tokenize.encode import load_tokenized
    from pipeline.training.finetune import TrainConfig

    ds = load_tokenized(args.data)
    if args.label_column not in ds.column_names:
        raise InputError(
            f"{args.data}: no column {args.label_column!r} (columns: {', '.join(ds.column_names)}); "
            "tokenize with --obs-columns including the label column"
        )
    names, labels = _label_names(ds[args.label_column])
    if len(names) < 2:
        raise InputError(
            f"{args.data}: column {args.label_column!r} has a single value {names}; need two or more classes"
        )
    ds = ds.remove_columns([c for c in ("label",) if c in ds.column_names]).add_column("label", labels.tolist())
    split = stratified_split(labels, args.validation, args.test, args.seed)
    train_idx, val_idx, test_idx = (np.flatnonzero(split == s) for s in ("train", "validation", "test"))
    parts = {
        "train": ds.select(train_idx.tolist()),
        "validation": ds.select(val_idx.tolist()),
        "test": ds.select(test_idx.tolist()),
    }
    dicts = _dictionaries(args.model, args.geneformer_dir)
    longest = int(np.max(ds["length"])) if len(ds) else 0
    max_len = args.max_len or None
    config = TrainConfig(
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        class_weights=args.class_weights,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
        max_len=max_len,
    ).validate()
    # Refuse a mismatched model before a run is recorded.
    from pipeline.models.load import check_model_inputs, read_model_config

    model_config = read_model_config(args.model)
    parse_mode(args.mode, model_config.num_hidden_layers)
    check_model_inputs(
        model_config, dicts=dicts, max_len=max_len or longest, model_dir=args.model, data_source=f"cells in {args.data}"
    )

    from pipeline.paths import open_store
    from store import results as R

    store = open_store(args.store)
    name = args.name or f"{args.label_column}/{args.mode}"
    run_id = store.create_run(
        name,
        R.KIND_FINETUNE,
        {
            "task": args.label_column,
            "mode": args.mode,
            "labels": names,
            "data": str(args.data),
            "train": {k: v for k, v in vars(config).items()},
            "nproc": args.nproc,
            "split": {"validation": args.validation, "test": args.test},
        },
        data_path=str(args.data),
        model_path=str(args.model),
        device=args.device,
    )
    from pipeline.parallel.launch import finetune_model
    from pipeline.progress import Reporter
    from pipeline.run.stages.finetune import FinetuneStoreRecorder

    rep = Reporter()  # the terminal only: the recorder writes the run's progress to the store
    with store.track(run_id), contextlib.closing(rep):
        store.put_labels(run_id, args.label_column, names)
        split_names = np.empty(len(ds), dtype=object)
        split_names[train_idx], split_names[val_idx], split_names[test_idx] = (
            R.SPLIT_TRAIN,
            R.SPLIT_VALIDATION,
            R.SPLIT_TEST,
        )
        store.put_split(run_id, [str(c) for c in ds["cell_id"]], split_names.tolist())
        result = finetune_model(
            args.model,
            parts,
            label_names=names,
            mode=args.mode,
            config=config,
            nproc=args.nproc,
            recorder=FinetuneStoreRecorder(store, run_id, on_progress=rep.callback(stage=R.STAGE_FINETUNE)),
            out_dir=args.out,
            dicts=dicts,
            load_options={"max_len": max_len or longest, "data_source": f"cells in {args.data}"},
        )
    from pipeline.training.finetune import save_split

    save_split(args.out, ds["cell_id"], split, data=str(args.data))
    m = result.test_metrics
    print(
        f"{name}: test accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} "
        f"(best epoch {result.best_epoch}); model saved to {Path(args.out)}"
    )
    width = max(5, max(len(n) for n in names))
    print(" " * (width + 2) + " ".join(f"{n:>{width}}" for n in names) + "   (rows: true, columns: predicted)")
    for n, row in zip(names, result.confusion):
        print(f"{n:>{width}}  " + " ".join(f"{int(v):>{width}}" for v in row))
    print(f"run {run_id}")
    return 0
