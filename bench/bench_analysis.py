"""Benchmark: the full per-model analysis, in cells per second, against the bare forward passes it needs.

A V1-6L-sized `BertForSequenceClassification` (the Geneformer V1-6L config from --config / $GFATTN_SHARED, or
a built-in equivalent: 6 layers, hidden 256, 4 heads, intermediate 512, 2048 positions) with random weights,
2 labels, and synthetic rank-value cells of exactly L tokens (L in --lengths, default 512 and 2048): genes drawn
without replacement from a pool of 4 L genes with Zipf-like frequencies, so that deleted gene sets touch some
cells and not others. On whatever device it finds (`--device auto`: CUDA when torch sees a GPU), for each L:

- analysis: what one model of an analysis pair costs (`pipeline.run.driver`): the streamed attention sums
            (`analyze_attention`, one model), attribution (`run_attribution`: Hao et al. with --hao-steps,
            integrated gradients with --ig-steps, rollout), and in-silico deletion (`DeletionEngine` +
            `set_deletion`: the top-k genes of summed attention and of Hao attribution for k in --ks, with
            --random-sets matched random sets each, bootstrap 50);
- baseline: the bare passes that analysis needs, counted as the pipeline's plan counts them
            (`pipeline.run.plan`: 1 forward for attention; Hao: 1 forward + steps x (layers + 1) / 2
            input-gradient passes; IG: steps input-gradient passes in its wide batches + 2 forwards; rollout
            1 forward; deletion: the forwards its engine ran, counted), each kind timed here on batches of
            the same cells (`pipeline.run.plan.time_units`) and multiplied out.

Printed per L: cells/s of the analysis and of its baseline, and analysis / baseline (how much the streaming,
reductions, bookkeeping and statistics add over the model's own passes); on CUDA also the peak memory.
Defaults keep a CPU run to a few minutes (--cells 1, 2 Hao steps, 4 IG steps, k = 5, 2 random sets); on CUDA
64 cells, 20 Hao steps, 50 IG steps (the pipeline's defaults), k = 1, 5, 20, 5 random sets.

    python bench/bench_analysis.py [--device auto|cpu|cuda] [--cells N] [--lengths 512,2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BUILT_IN_V1_6L = {
    "hidden_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 2048,
    "vocab_size": 25426,
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.02,
    "attention_probs_dropout_prob": 0.02,
    "pad_token_id": 0,
    "type_vocab_size": 2,
}


def _config(path: str | None):
    from _measure import config_path
    from transformers import BertConfig

    try:
        doc = json.loads(config_path(path).read_text())
        source = str(config_path(path))
    except SystemExit:
        doc, source = dict(BUILT_IN_V1_6L), "built-in V1-6L equivalent"
    doc = {k: v for k, v in doc.items() if k not in ("architectures", "transformers_version")}
    config = BertConfig(**doc)
    config.num_labels = 2
    return config, source


def _cells(n: int, length: int, vocab: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = np.arange(4, min(vocab, 4 * length + 4))
    weights = 1.0 / np.arange(1, len(pool) + 1) ** 0.8
    weights /= weights.sum()
    ids = [rng.choice(pool, size=length, replace=False, p=weights).tolist() for _ in range(n)]
    return {"input_ids": ids, "length": [length] * n, "label": [i % 2 for i in range(n)]}


def bench_length(args, config, length: int) -> dict:
    import numpy as np
    import torch
    from transformers import BertForSequenceClassification

    from pipeline.analysis.attention import analyze_attention
    from pipeline.analysis.attribution import run_attribution
    from pipeline.analysis.deletion import DeletionEngine, gene_frequency_rank, set_deletion
    from pipeline.analysis.keygenes import frequency_rank_bins
    from pipeline.run import plan as P
    from pipeline.tokenize.cells import Cells

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = BertForSequenceClassification(config).to(device).eval()
    data = _cells(args.cells, length, int(config.vocab_size), args.seed)
    labels = np.asarray(data["label"], dtype=np.int64)
    nl = int(config.num_hidden_layers)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # warm-up on one cell (kernels, numba compilation), not measured
    one = {k: v[:1] for k, v in data.items()}
    analyze_attention(model, None, one, pad_id=0, batch_size=1, device=device, cell_curves=False)
    run_attribution(model, Cells(one), labels[:1], hao_steps=1, ig_steps=2, batch_size=1, device=device)

    times = {}
    sync()
    t0 = time.perf_counter()
    attention = analyze_attention(
        model, None, data, pad_id=0, batch_size=args.batch_size, device=device, cell_curves=False
    )
    sync()
    times["attention"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    attr = run_attribution(
        model,
        Cells(data),
        labels,
        hao_steps=args.hao_steps,
        ig_steps=args.ig_steps,
        batch_size=args.batch_size,
        device=device,
    )
    sync()
    times["attribution"] = time.perf_counter() - t0

    genes = np.unique(np.concatenate([np.asarray(x) for x in data["input_ids"]]))
    n_cells, rank_mean = gene_frequency_rank(data["input_ids"], genes)
    bins = frequency_rank_bins(n_cells, rank_mean)
    attn_gene = np.asarray(attention.gene_sum)[0].sum(axis=(0, 1)) if attention.gene_sum is not None else None
    by_attention = genes[np.argsort(-attn_gene[genes], kind="stable")] if attn_gene is not None else genes
    hao_gene = np.asarray(attr.gene_sum["hao"]).reshape(-1, attr.gene_sum["hao"].shape[-1]).sum(0)
    by_hao = genes[np.argsort(-hao_gene[genes], kind="stable")]
    forwards = {"n": 0}
    t0 = time.perf_counter()
    engine = DeletionEngine(model, data, labels, batch_size=P.DELETION_BATCH, device=device)
    plain_forward = engine._forward

    def counted(ids, mask):
        forwards["n"] += int(ids.shape[0])
        return plain_forward(ids, mask)

    engine._forward = counted
    set_deletion(
        engine,
        {"attn": by_attention, "hao": by_hao},
        tuple(args.ks),
        candidates=genes,
        bins=bins,
        n_random=args.random_sets,
        n_boot=50,
        seed=args.seed,
    )
    sync()
    times["deletion"] = time.perf_counter() - t0
    peak = int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None

    # baseline: per-cell cost of each kind of bare pass on these cells, times the passes the analysis needs
    batches = {
        "forward": args.batch_size,
        "forward_wide": P.DELETION_BATCH,
        "gradient": args.batch_size,
        "gradient_wide": args.batch_size * args.ig_steps,
    }
    timing = P.time_units(model, [length], batches=batches, device=device, seed=args.seed)
    unit = {k: v[0] for k, v in timing.items() if k != "lengths"}
    n = args.cells
    hao_f, hao_g = P.hao_passes(n, args.hao_steps, nl)
    ig_f, ig_g = P.ig_passes(n, args.ig_steps)
    baseline = {
        "attention": n * unit["forward"],
        "attribution": (hao_f + ig_f + n) * unit["forward"] + hao_g * unit["gradient"] + ig_g * unit["gradient_wide"],
        "deletion": forwards["n"] * unit["forward_wide"],
    }
    return {"times": times, "baseline": baseline, "peak": peak, "deletion_forwards": forwards["n"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--config", help="a BERT config.json (default: Geneformer V1-6L, else a built-in equivalent)")
    p.add_argument("--cells", type=int, help="cells per length (default: 1 on CPU, 64 on CUDA)")
    p.add_argument("--lengths", default="512,2048", help="tokens per cell, comma-separated (default 512,2048)")
    p.add_argument("--batch-size", type=int, help="cells per batch (default: 1 on CPU, 8 on CUDA)")
    p.add_argument("--hao-steps", type=int, help="Hao attribution steps (default: 2 on CPU, 20 on CUDA)")
    p.add_argument("--ig-steps", type=int, help="integrated-gradients steps (default: 4 on CPU, 50 on CUDA)")
    p.add_argument("--ks", help="deleted top-k set sizes (default: 5 on CPU, 1,5,20 on CUDA)")
    p.add_argument("--random-sets", type=int, help="matched random sets per top-k set (default: 2 on CPU, 5 on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from pipeline.compute import pin_threads, resolve_device

    args.device = resolve_device(args.device).type
    threads = pin_threads(args.threads or None)
    gpu = args.device == "cuda"
    args.cells = args.cells or (64 if gpu else 1)
    args.batch_size = args.batch_size or (8 if gpu else 1)
    args.hao_steps = args.hao_steps or (20 if gpu else 2)
    args.ig_steps = args.ig_steps or (50 if gpu else 4)
    args.ks = [int(k) for k in (args.ks or ("1,5,20" if gpu else "5")).split(",")]
    args.random_sets = args.random_sets if args.random_sets is not None else (5 if gpu else 2)
    config, source = _config(args.config)
    name = torch.cuda.get_device_name() if gpu else f"CPU, {threads} threads"
    print(
        f"device {args.device} ({name}); model {source}: {config.num_hidden_layers} layers x {config.hidden_size}, "
        f"{config.num_attention_heads} heads, random weights; {args.cells} cells per length, batch {args.batch_size}; "
        f"Hao {args.hao_steps} steps, IG {args.ig_steps} steps, deletion k {args.ks} x (1 + {args.random_sets}) sets"
        " for 2 scores",
        flush=True,
    )
    print(f"{'tokens':>6} {'part':<12} {'seconds':>9} {'cells/s':>9} {'bare s':>9} {'ratio':>7}")
    for length in [int(x) for x in args.lengths.split(",") if x.strip()]:
        if length > int(config.max_position_embeddings):
            print(f"{length:>6} skipped: more than the model's {config.max_position_embeddings} positions")
            continue
        r = bench_length(args, config, length)
        for part in ("attention", "attribution", "deletion"):
            t, b = r["times"][part], r["baseline"][part]
            print(f"{length:>6} {part:<12} {t:>9.2f} {args.cells / t:>9.3g} {b:>9.2f} {t / b:>6.2f}x")
        t, b = sum(r["times"].values()), sum(r["baseline"].values())
        line = f"{length:>6} {'analysis':<12} {t:>9.2f} {args.cells / t:>9.3g} {b:>9.2f} {t / b:>6.2f}x"
        if r["peak"] is not None:
            line += f"  peak GPU memory {r['peak'] / 2**20:.0f} MiB"
        print(line + f"  ({r['deletion_forwards']} deletion forwards)", flush=True)
    print("ratio: the analysis's time over the bare forward and backward passes it needs (timed in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
