"""Benchmark: Hao et al.'s self-attention attribution, streamed vs the published code's approach.

V1-6L Geneformer configuration (`BertForSequenceClassification`, 2 labels) with random weights; the same
length-bucketed batches and the true-class logit for every method:

- streamed: `pipeline.analysis.attribution.hao_attribution` (per layer, one gradient of the attention output,
            the attribution reduced block by block of query rows; SDPA elsewhere);
- naive:    the published code's approach (github.com/YRdddream/attattr): for each layer and alpha a full
            eager forward from the embeddings whose layer-l probabilities are the leaf alpha A, every
            layer's attention kept, and each layer's summed gradient dF/dA (B, H, L, L) kept until the
            end, then the same reductions. Also the check: its sums must equal the streamed ones;
- fb:       m forward+backward passes of the whole model (SDPA, gradient wrt the embeddings): the
            unit the streamed cost is reported in.

Workloads: sci-Plex-like lengths (median ~680 tokens) and full 2048-token cells; `--small`: shorter
cells (median ~340, and 512 tokens) for a quick check. Each method runs in its own subprocess so that peak
memory is that run's alone: on CPU the peak resident set size during the timed call (VmHWM after resetting
it through /proc/self/clear_refs, else ru_maxrss) minus the resident size before it; on CUDA
`torch.cuda.max_memory_allocated` minus the allocation before it. One timed run per method.

    python bench/bench_attribution.py [--device cpu|cuda] [--small] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

WORKLOADS = {
    # name: (cells, how lengths are drawn, batch size)
    "sciplex": (4, ("normal", 680, 200, 150, 1430), 2),
    "2048": (1, ("full", 2048), 1),
    "sciplex-small": (2, ("normal", 340, 100, 100, 700), 2),
    "512": (1, ("full", 512), 1),
}
METHODS = ("fb", "streamed", "naive")


def _dataset(workload: str, vocab: int, seed: int = 0):
    import numpy as np

    n, kind, _ = WORKLOADS[workload]
    rng = np.random.default_rng(seed)
    if kind[0] == "full":
        lengths = np.full(n, kind[1])
    else:
        _, mean, sd, lo, hi = kind
        lengths = np.clip(rng.normal(mean, sd, n).round().astype(int), lo, hi)
    seqs = [rng.choice(np.arange(2, vocab), int(k), replace=False).tolist() for k in lengths]
    return {"input_ids": seqs, "label": [i % 2 for i in range(n)]}, lengths


class _NaiveEngine:
    """Eager attention with every layer's probabilities materialised; the target layer's are the leaf alpha A."""

    def __init__(self, layers):
        self.layer_of = {id(layer.attention.self): i for i, layer in enumerate(layers)}
        self.target, self.alpha, self.leaf, self.probs, self.key_mask = None, 1.0, None, {}, None

    def attend(self, module, query, key, value, attention_mask, scaling):
        import torch

        layer = self.layer_of[id(module)]
        scores = query @ key.transpose(-1, -2) * scaling
        scores = scores.masked_fill(~self.key_mask, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        self.probs[layer] = p  # kept, as output_attentions=True keeps every layer's attention
        if layer == self.target:
            self.leaf = (self.alpha * p.detach()).requires_grad_(True)
            p = self.leaf
        return (p @ value).transpose(1, 2)


def naive_hao(model, data, *, steps, batch_size, device):
    """Hao attribution the published way; returns the (nl, H, P) rank sums and (nl, H) head-max sums."""
    import numpy as np
    import torch

    from pipeline.analysis.attention import routed_attention
    from pipeline.tokenize.batching import length_grouped_batches, pad_batch

    layers = list(model.bert.encoder.layer)
    nl, H = len(layers), model.config.num_attention_heads
    P = max(len(s) for s in data["input_ids"])
    rank = np.zeros((nl, H, P))
    head_max = np.zeros((nl, H))
    engine = _NaiveEngine(layers)
    labels = torch.tensor(data["label"], device=device)
    for idx in length_grouped_batches(np.array([len(s) for s in data["input_ids"]]), batch_size):
        ids, mask = pad_batch([data["input_ids"][i] for i in idx], pad_token_id=0)
        ids, mask = ids.to(device), mask.to(device)
        engine.key_mask = mask.bool()[:, None, None, :]
        y = labels[torch.as_tensor(idx, device=device)]
        grads, attention = [], []
        with routed_attention([model], engine):
            for layer in range(nl):
                total = None
                for k in range(1, steps + 1):
                    engine.target, engine.alpha = layer, k / steps
                    logits = model(input_ids=ids, attention_mask=mask).logits
                    (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), engine.leaf)
                    total = g if total is None else total + g
                attention.append(engine.probs[layer].detach())
                grads.append(total)  # every layer's gradient kept until the end
        m_rows = mask[:, None, :, None].to(grads[0].dtype)
        real = m_rows.bool() & mask.bool()[:, None, None, :]
        for layer in range(nl):
            attr = attention[layer] * grads[layer] / steps
            rank[layer, :, : ids.shape[1]] += (attr * m_rows).sum(2).sum(0).double().cpu().numpy()
            head_max[layer] += attr.masked_fill(~real, float("-inf")).amax((2, 3)).sum(0).double().cpu().numpy()
        engine.probs = {}
    return rank, head_max


def worker(args) -> dict:
    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.analysis.attribution import hao_attribution
    from pipeline.tokenize.batching import length_grouped_batches, pad_batch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg_dict = json.loads(Path(args.config_path).read_text())
    torch.manual_seed(1)
    impl = "sdpa" if args.method == "fb" else "eager"
    cfg = BertConfig(**{**cfg_dict, "num_labels": 2}, attn_implementation=impl)
    model = BertForSequenceClassification(cfg).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    data, lengths = _dataset(args.workload, cfg_dict["vocab_size"])
    batch_size = WORKLOADS[args.workload][2]
    steps = args.steps

    def fb():
        y_all = torch.tensor(data["label"], device=device)
        for idx in length_grouped_batches(lengths, batch_size):
            ids, mask = pad_batch([data["input_ids"][i] for i in idx], pad_token_id=0)
            ids, mask = ids.to(device), mask.to(device)
            y = y_all[torch.as_tensor(idx, device=device)]
            for _ in range(steps):
                captured = []

                def grad_input(module, inputs, output, captured=captured):
                    captured.append(output.requires_grad_(True))
                    return output

                handle = model.bert.embeddings.word_embeddings.register_forward_hook(grad_input)
                try:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                finally:
                    handle.remove()
                torch.autograd.grad(logits.gather(1, y[:, None]).sum(), captured[0])

    def run():
        if args.method == "streamed":
            r = hao_attribution(model, data, np.array(data["label"]), steps=steps, batch_size=batch_size, device=device)
            return r.rank_sum["hao"], r.head_max_sum
        if args.method == "naive":
            return naive_hao(model, data, steps=steps, batch_size=batch_size, device=device)
        fb()
        return None

    # warm-up on one short cell (allocator, kernels), not measured
    short = {"input_ids": [data["input_ids"][0][:16]], "label": [0]}
    if args.method == "streamed":
        hao_attribution(model, short, np.array([0]), steps=1, batch_size=1, device=device)
    elif args.method == "naive":
        naive_hao(model, short, steps=1, batch_size=1, device=device)
    out, timing = _measure.measure(run, device)
    result = {
        "method": args.method,
        "workload": args.workload,
        **timing,
        **_measure.lengths_summary(lengths),
        "steps": steps,
    }
    if out is not None:
        np.save(args.out, np.concatenate([np.ravel(out[0]), np.ravel(out[1])]))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="alpha steps m (default 20, Hao et al.'s)")
    p.add_argument("--small", action="store_true", help="shorter cells (median ~340, and 512 tokens): a quick run")
    p.add_argument("--config", default=None, help="BERT config.json (default: shared V1-6L-10M)")
    p.add_argument("--workloads", default=None, help="comma-separated; default sciplex,2048 (small: sciplex-small,512)")
    p.add_argument("--methods", default=",".join(METHODS))
    _measure.add_worker_arguments(p)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _measure.print_result(worker(args))
        return 0
    import tempfile

    import numpy as np

    config = _measure.config_path(args.config)
    workloads = (args.workloads or ("sciplex-small,512" if args.small else "sciplex,2048")).split(",")
    print(f"config {config}; device {args.device}; threads {args.threads}; m = {args.steps}")
    results: dict[tuple[str, str], dict] = {}
    sums: dict[tuple[str, str], np.ndarray] = {}
    tmp = tempfile.mkdtemp(prefix="bench_attribution_")
    for workload in workloads:
        for method in args.methods.split(","):
            out_path = os.path.join(tmp, f"{workload}_{method}.npy")
            extra = ["--steps", args.steps, "--out", out_path]
            r, failure = _measure.run_worker(__file__, args, method, workload, config, extra)
            if r is None:
                print(f"{workload:>13} {method:>9}: {failure}")
                continue
            results[(workload, method)] = r
            if os.path.exists(out_path):
                sums[(workload, method)] = np.load(out_path)
            print(f"{workload:>13} {method:>9}: {_measure.result_line(r)}", flush=True)
    print()
    print("ratios: naive / streamed (what the published approach costs more); streamed / fb (the streamed")
    print("attribution's cost in units of m forward+backward passes of the model). Wall (CPU) time.")
    for workload in workloads:
        s, n, f = (results.get((workload, m)) for m in ("streamed", "naive", "fb"))
        parts = []
        if s and n:
            parts.append(
                f"naive/streamed time {n['seconds'] / s['seconds']:.2f}x ({n['cpu_seconds'] / s['cpu_seconds']:.2f}x), "
                f"peak memory {n['peak_bytes'] / max(s['peak_bytes'], 1):.1f}x"
            )
            a, b = sums.get((workload, "streamed")), sums.get((workload, "naive"))
            if a is not None and b is not None:
                parts.append(f"max |streamed - naive| / max |naive| = {np.abs(a - b).max() / np.abs(b).max():.1e}")
        if s and f:
            parts.append(
                f"streamed/fb time {s['seconds'] / f['seconds']:.2f}x ({s['cpu_seconds'] / f['cpu_seconds']:.2f}x), "
                f"peak memory {s['peak_bytes'] / max(f['peak_bytes'], 1):.1f}x"
            )
        print(f"{workload:>13}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
