"""Benchmark: streaming attention analysis vs the `output_attentions=True` baseline and plain SDPA inference.

Both analyses compute analyses 1-4 of docs/architecture.md ("Attention analyses") for two models with the V1-6L
Geneformer configuration and random weights, on the same length-bucketed batches:

- streaming: `pipeline.analysis.attention.analyze_attention` (one block of attention rows alive at a time);
- naive:     `pipeline.analysis.attention.naive_attention_reductions` (`output_attentions=True` for each model,
             all layers kept, then the same reductions);
- sdpa:      a plain inference pass of the two models with `attn_implementation="sdpa"` (no analysis).

Two workloads: sci-Plex-like lengths (median ~680 tokens, 16 cells = 2 length-bucketed batches) and
full 2048-token cells (8 cells), batch 8. Each method runs in its own subprocess so that peak memory is
that run's alone: on CPU the peak resident set size during the timed calls (VmHWM after resetting it
through /proc/self/clear_refs, else ru_maxrss) minus the resident size before them; on CUDA
`torch.cuda.max_memory_allocated` minus the allocation before them. Times are the best of `--repeat`
runs for sdpa and streaming (shared machines are noisy); the naive baseline, which takes minutes at
2048 tokens, runs once.

    python bench/bench_attention.py [--device cuda] [--dtype bfloat16] [--threads 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

WORKLOADS = {
    # name: (number of cells, how lengths are drawn)
    "sciplex": (16, "sciplex"),
    "2048": (8, "full"),
}
METHODS = ("sdpa", "streaming", "naive")


def _dataset(workload: str, max_pos: int, vocab: int, seed: int = 0):
    import numpy as np

    n, kind = WORKLOADS[workload]
    rng = np.random.default_rng(seed)
    if kind == "full":
        lengths = np.full(n, max_pos)
    else:
        lengths = np.clip(rng.normal(680, 200, n).round().astype(int), 150, 1430)
    seqs = [rng.choice(np.arange(2, vocab), int(k), replace=False).tolist() for k in lengths]
    return {"input_ids": seqs}, lengths


def worker(args) -> dict:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.analysis.attention import analyze_attention, naive_attention_reductions
    from pipeline.analysis.pair import result_differences
    from pipeline.tokenize.batching import length_grouped_batches, pad_batch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg_dict = json.loads(Path(args.config_path).read_text())
    impl = "sdpa" if args.method == "sdpa" else "eager"
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        cfg = BertConfig(**{**cfg_dict, "num_labels": 2}, attn_implementation=impl)
        models.append(BertForSequenceClassification(cfg).eval().to(device))
    data, lengths = _dataset(args.workload, cfg_dict["max_position_embeddings"], cfg_dict["vocab_size"])
    batches = length_grouped_batches(lengths, args.batch_size)

    dtype = getattr(torch, args.dtype)

    def run():
        if args.method == "streaming":
            return analyze_attention(
                models[0], models[1], data, pad_id=0, batch_size=args.batch_size, device=device, dtype=dtype
            )
        if args.method == "naive":
            return naive_attention_reductions(
                models[0], models[1], data, pad_id=0, batch_size=args.batch_size, device=device
            )
        with torch.inference_mode():
            for idx in batches:
                ids, mask = pad_batch([data["input_ids"][i] for i in idx], pad_token_id=0)
                ids, mask = ids.to(device), mask.to(device)
                for m in models:
                    m.base_model(input_ids=ids, attention_mask=mask)
        return None

    # warm-up on two short cells (allocator, kernels), not measured
    short = {"input_ids": [s[:32] for s in data["input_ids"][:2]]}
    if args.method == "streaming":
        # also compiles (or loads from numba's cache) the CPU reduction kernels that long cells use
        analyze_attention(
            models[0],
            models[1],
            short,
            pad_id=0,
            batch_size=2,
            device=device,
            kernel="numba" if device.type == "cpu" else "auto",
        )
    elif args.method == "naive":
        naive_attention_reductions(models[0], models[1], short, pad_id=0, batch_size=2, device=device)
    result, timing = _measure.measure(run, device, args.repeat if args.method != "naive" else 1)
    errors = None
    if args.method == "streaming" and dtype != torch.float32:
        reference = analyze_attention(
            models[0], models[1], data, pad_id=0, batch_size=args.batch_size, device=device, dtype=torch.float32
        )
        errors = result_differences(result, reference)
    return {
        "errors": errors,
        "method": args.method,
        "workload": args.workload,
        **timing,
        **_measure.lengths_summary(lengths),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="timed runs of sdpa and streaming, best kept (default 2); the naive baseline runs once",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="streaming analysis dtype; bfloat16 (CUDA) also reports its error against float32",
    )
    p.add_argument("--config", default=None, help="BERT config.json (default: shared V1-6L-10M)")
    p.add_argument("--workloads", default="sciplex,2048")
    p.add_argument("--methods", default=",".join(METHODS))
    _measure.add_worker_arguments(p)
    args = p.parse_args(argv)
    if args.worker:
        _measure.print_result(worker(args))
        return 0
    config = _measure.config_path(args.config)
    print(f"config {config}; device {args.device}; threads {args.threads}; batch {args.batch_size}")
    results: dict[tuple[str, str], dict] = {}
    for workload in args.workloads.split(","):
        for method in args.methods.split(","):
            extra = ["--batch-size", args.batch_size, "--dtype", args.dtype, "--repeat", args.repeat]
            r, failure = _measure.run_worker(__file__, args, method, workload, config, extra)
            if r is None:
                print(f"{workload:>8} {method:>10}: {failure}")
                continue
            results[(workload, method)] = r
            print(f"{workload:>8} {method:>10}: {_measure.result_line(r)}", flush=True)
            if r.get("errors"):
                errs = ", ".join(f"{k} {v:.2e}" for k, v in r["errors"].items())
                print(f"{'':>20}{args.dtype} vs float32, max relative difference: {errs}")
    print()
    print("ratios (naive / streaming: how much the baseline costs more; streaming / sdpa: the analysis'")
    print("cost over plain inference). Time as wall (CPU) seconds; on a shared machine CPU time is steadier.")
    for workload in args.workloads.split(","):
        s, n, d = (results.get((workload, m)) for m in ("streaming", "naive", "sdpa"))
        parts = []
        if s and n:
            mem = n["peak_bytes"] / max(s["peak_bytes"], 1)
            parts.append(
                f"naive/streaming time {n['seconds'] / s['seconds']:.2f}x "
                f"({n['cpu_seconds'] / s['cpu_seconds']:.2f}x), peak memory {mem:.1f}x"
            )
        if s and d:
            parts.append(
                f"streaming/sdpa time {s['seconds'] / d['seconds']:.2f}x "
                f"({s['cpu_seconds'] / d['cpu_seconds']:.2f}x), "
                f"peak memory {s['peak_bytes'] / max(d['peak_bytes'], 1):.1f}x"
            )
        print(f"{workload:>8}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
