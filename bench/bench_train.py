"""Training throughput (cells/s): length-grouped dynamic padding against padding to the model input size.

Cells get sci-Plex-like lengths (median ~680 genes, at most ~1,400). Three ways to form batches of the same
cells, each timed on the same model and optimiser (AdamW, full fine-tuning step):

- gfattn: length-grouped batches (`pipeline.tokenize.batching.length_grouped_batches`), padded to their own longest;
- baseline: random batches padded to the model input size (2,048 for V1), the named baseline;
- random-dynamic (for reference): random batches padded to their own longest, as Geneformer's collator does.

Prints cells/s of each and the ratio gfattn / baseline. The V1-6L architecture (hidden 256, 6 layers,
2,048 positions, vocabulary 25,426) is used by default; `--small` uses a 2-layer, hidden-128 model with
the same input size, for CPU runs that should finish in a couple of minutes.

    python bench/bench_train.py --small                # CPU
    python bench/bench_train.py --device cuda --steps 20 --cells 2000
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

V1_6L = dict(
    vocab_size=25426,
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=2048,
)
SMALL = dict(
    vocab_size=25426,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    max_position_embeddings=2048,
)


def sciplex_like_lengths(n: int, seed: int = 0, median: int = 680, longest: int = 1400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(median), 0.35, n)).astype(int)
    lengths = np.clip(lengths, 100, longest)
    lengths[0] = longest
    return lengths


def build_model(spec: dict, device, seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_act="relu",
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.02,
        pad_token_id=0,
        num_labels=2,
        **spec,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).to(device)


def time_variant(model, cells, labels, batches, *, pad_to, device, amp_dtype, warmup: int = 1):
    """Train on `batches` (index arrays); returns (cells/s over the timed batches, mean padded width)."""
    import contextlib

    import torch

    from pipeline.tokenize.batching import pad_batch

    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.001)
    widths, n_cells, elapsed = [], 0, 0.0
    for i, idx in enumerate(batches):
        ids, mask = pad_batch([cells[j] for j in idx], pad_token_id=0, pad_to=pad_to)
        y = torch.as_tensor(labels[idx], device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ctx = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=y)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            elapsed += time.perf_counter() - t0
            n_cells += len(idx)
            widths.append(ids.shape[1])
    return n_cells / max(elapsed, 1e-9), float(np.mean(widths)) if widths else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--small", action="store_true", help="2 layers, hidden 128 (same 2,048 input size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument(
        "--cells", type=int, default=0, help="pool of cells the timed ones are drawn from (default: 50 x batch size)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--amp", choices=["auto", "off"], default="auto", help="bf16 autocast on CUDA")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from pipeline.tokenize.batching import length_grouped_batches

    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    amp_dtype = torch.bfloat16 if (use_cuda and args.amp == "auto") else None
    spec = SMALL if args.small else V1_6L
    n_cells = max(args.cells or 50 * args.batch_size, (args.steps + args.warmup) * args.batch_size)
    lengths = sciplex_like_lengths(n_cells, args.seed)
    rng = np.random.default_rng(args.seed)
    cells = [rng.integers(2, spec["vocab_size"], size=int(n)) for n in lengths]
    labels = rng.integers(0, 2, size=n_cells)
    model = build_model(spec, device, args.seed)
    take = args.steps + args.warmup

    # Every variant trains on the same cells (a random sample of steps x batch size), so throughputs
    # compare batching alone; warm-up batches come from other cells and are not timed.
    perm = rng.permutation(n_cells)
    bs = args.batch_size
    warm = [perm[i * bs : (i + 1) * bs] for i in range(args.warmup)]
    subset = perm[args.warmup * bs : take * bs]
    grouped = warm + [subset[b] for b in length_grouped_batches(lengths[subset], bs)]
    random_batches = warm + [subset[i : i + bs] for i in range(0, len(subset), bs)]
    size = spec["max_position_embeddings"]

    print(
        f"device {device}{' (bf16 autocast)' if amp_dtype else ''}, model "
        f"{'small (2 x 128)' if args.small else 'V1-6L (6 x 256)'}, batch {args.batch_size}, "
        f"{args.steps} timed steps per variant; cell lengths median {int(np.median(lengths))}, "
        f"max {int(lengths.max())}",
        flush=True,
    )
    results = {}
    for name, batches, pad_to in (
        ("gfattn: length-grouped, padded to own longest", grouped, None),
        (f"baseline: random, padded to input size {size}", random_batches, size),
        ("reference: random, padded to own longest", random_batches, None),
    ):
        rate, width = time_variant(
            model, cells, labels, batches, pad_to=pad_to, device=device, amp_dtype=amp_dtype, warmup=args.warmup
        )
        results[name] = rate
        print(f"  {name:<48} {rate:8.2f} cells/s   (mean padded width {width:.0f})", flush=True)
    names = list(results)
    print(f"ratio gfattn / baseline (pad to {size}): {results[names[0]] / results[names[1]]:.2f}x")
    print(f"ratio gfattn / random batches padded to own longest: {results[names[0]] / results[names[2]]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
