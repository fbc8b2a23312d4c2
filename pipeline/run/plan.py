"""The cost plan of a `gfattn pipeline` run, before it runs (`gfattn pipeline --plan`) and stored on it.

Per stage the run would execute (data, model, tokenize, record, each fine-tuning, DE, each analysis with its
parts: attention, attribution hao / ig / rollout, deletion, randomisation cascade), the plan counts the work
(cells, tokens, forward passes, forward+backward passes, streamed attention passes) and estimates its time on
this device from a few timed batches of the run's own model architecture at the run's own lengths.

Two halves, kept apart so the counts can be tested against a direct count:

- **Counting** (`Shape`, `count_stages`): pure functions of the configuration and the shape of the data
  (cells per split, lengths, layers, how many cells a deleted gene set touches). A *pass* is one cell through
  one full model; fractional passes are work on part of the model (Hao attribution runs layers l..L-1 for layer
  l's alphas: (L + 1) / 2 full passes per alpha; `last-K` fine-tuning back-propagates through K of L layers).
- **Timing** (`time_units`): seconds per cell of each kind of pass (`KINDS`: forward, forward+backward with
  parameter gradients, the input gradient attribution runs, the streaming attention engine on a pair and on
  one model), each in the batch size its stage uses and at the smallest, median and largest length of the
  cells, with random token ids and the run's architecture (random weights cost what trained ones do). A cell
  of length L costs the linear interpolation of those. `estimate` multiplies: seconds = sum over kinds of
  passes x the mean per-cell cost of the cells' lengths. Library work that is not a model pass (scanpy's
  UMAP and Wilcoxon test, data generation, statistics) gets a rough fixed allowance (`ROUGH`), marked `~`
  in the printed plan. Timings are medians on the machine as loaded as it is when the plan is made.

`pipeline.commands.pipeline.plan_before_run(cfg, store_path)` is `--plan`: the same preflight as a real run,
then the selection and a sample of the selected cells tokenized (without writing the tokenization cache; the
synthetic data set is generated into the cache as the run would). `record_plan(ctx, ...)` stores the plan of a
running pipeline (JSON `plan` on the pipeline run) once its cells are tokenized: exact lengths, the run's
model. `format_plan(plan)` renders either as lines of text (the CLI; the TUI's New run form).

One module: the counting (pure) and the timing of the plan describe the same stages; the counts are unit-
tested against direct loops, the timing is kept apart in its own functions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from pipeline.config import analysis_processes

PLAN_VERSION = 1
SAMPLE_CELLS = 256  # cells tokenized by --plan to learn the lengths and the genes
TIMING_TOKENS = 2048  # tokens per timed batch at most (fewer cells per batch at long lengths)
DELETION_BATCH = 64  # pipeline.analysis.deletion_report.run_deletion's batch
KINDS = ("forward", "forward_wide", "backward", "gradient", "gradient_wide", "attention_pair", "attention_one")
KIND_LABELS = {
    "forward": "forward",
    "forward_wide": f"forward ({DELETION_BATCH} cells)",
    "backward": "forward+backward",
    "gradient": "input gradient",
    "gradient_wide": "input gradient (IG rows)",
    "attention_pair": "streamed attention, pair",
    "attention_one": "streamed attention, one model",
}

# Rough allowances (seconds) for library work that is not a model pass, measured on 2 shared CPU cores with
# the quick preset; they are not timed by the plan (so they do not follow the machine's load), and the
# printed plan marks them with `~`.
ROUGH = {
    "start": 5.0,  # interpreter, torch and transformers imports, store, summary
    "data_cached": 0.5,
    "data_per_cell": 0.0015,  # generating the synthetic data (per obs row)
    "tokenize": 0.5,
    "tokenize_per_cell": 0.002,
    "umap": 12.0,  # scanpy's recipe, numba compilation included (14 s to 33 s for 691 cells, by load)
    "umap_per_cell": 0.008,
    "de_first": 3.0,  # scanpy import, gene mapping (the first use of its compiled kernels can take 10 s more)
    "de": 1.0,
    "de_per_cell": 0.004,
    "corpus_per_cell": 0.012,  # synthesising, building the vocabulary of and tokenizing a pretraining corpus
    "analysis": 1.0,  # statistics, bootstrap, gene tables, store writes of one analysis
    "deletion": 0.5,  # bootstrap of the deletion sets, per model
    "finetune": 0.3,
    "model": 0.5,  # reading an existing model and its dictionaries
    "processes": 8.0,  # starting the processes of a sharded analysis or fine-tuning (torchrun, imports), once per run
}


# ------------------------------------------------------------------------------------------- counting
@dataclass
class Shape:
    """What the counts depend on besides the configuration."""

    n_obs: int  # rows of the data (obs)
    n_selected: int
    split: dict[str, int]  # train / validation / test
    lengths: np.ndarray  # lengths of the selected cells (or of a sample of them)
    n_layers: int
    de_comparisons: list[tuple[str, str, str]] = field(default_factory=list)  # (task, group, reference)
    permuted: str = " (permuted labels)"  # the label-permutation fine-tunings' suffix (`experiment.PERMUTED`)
    pretrain_cells: int = 0  # corpus cells pretrained in the model stage (0: the model exists)
    pretrain_epochs: int = 0
    pretrain_lengths: np.ndarray | None = None
    data_cached: bool = True  # the data set exists (else generated in the data stage)
    tokenization_cached: bool = False
    has_counts: bool = True
    # deletion: fraction of cells holding at least one of the k most frequent genes, per k
    deletion_fraction: dict[int, float] = field(default_factory=dict)
    single_fraction: float = 0.0  # mean fraction of cells expressing one of the top genes deleted alone
    typical_fraction: float = 0.0  # median fraction of cells expressing a gene the scores rank (>= min cells)
    n_genes: int = 0  # distinct genes of the analysed cells (candidates of the deletion)

    @property
    def mean_length(self) -> float:
        return float(np.mean(self.lengths)) if len(self.lengths) else 0.0


@dataclass
class Part:
    """One stage (or part of an analysis stage) of the plan: its work and, once estimated, its time."""

    stage: str  # the stage's name as the run records it
    part: str = ""  # "", "attention", "attribution hao", "deletion", "randomisation cascade", ...
    cells: int = 0
    tokens: int = 0
    forward: float = 0.0  # cell passes, forward only
    forward_wide: float = 0.0  # forward passes in the deletion's wide batches
    backward: float = 0.0  # cell passes, forward + backward with parameter gradients (training)
    gradient: float = 0.0  # forward + backward to the inputs, parameters frozen (Hao attribution)
    gradient_wide: float = 0.0  # the same in integrated gradients' wide batches (cells x steps rows)
    attention_pair: float = 0.0  # cells through the streaming attention engine, two models
    attention_one: float = 0.0  # cells through the streaming attention engine, one model
    fixed_s: float = 0.0  # rough allowance for work that is not a model pass
    seconds: float = 0.0
    note: str = ""
    pretrain: bool = False  # passes at the pretraining lengths


def _test_cells(cfg: dict, shape: Shape) -> int:
    n = int(shape.split.get("test", 0))
    cap = int(cfg["analysis"]["max_cells"] or 0)
    return min(n, cap) if cap else n


def trainable_fraction(mode: str, n_layers: int) -> float:
    """The share of the encoder's layers a training mode back-propagates through (the head aside)."""
    from pipeline.config import parse_mode

    kind, k = parse_mode(mode)
    if kind == "frozen":
        return 0.0
    if kind == "unfrozen":
        return 1.0
    if kind == "last":
        return min(k, n_layers) / max(n_layers, 1)
    return max(n_layers - k, 0) / max(n_layers, 1)  # freeze-N


def finetune_passes(mode: str, shape: Shape, epochs: int) -> tuple[float, float]:
    """(forward, forward+backward) cell passes of one fine-tuning: `frozen` encodes every cell once and
    trains the head on the cached features; other modes run every epoch over the training cells (back-
    propagating through their share of the layers) and the validation cells, then the test cells once."""
    train, val, test = (int(shape.split.get(s, 0)) for s in ("train", "validation", "test"))
    f = trainable_fraction(mode, shape.n_layers)
    if f == 0.0:
        return float(train + val + test), 0.0
    return epochs * train * (1 - f) + epochs * val + test, epochs * train * f


def hao_passes(n_cells: int, steps: int, n_layers: int) -> tuple[float, float]:
    """Hao attribution: one forward per cell, and per layer l and alpha a forward+backward of layers l..L-1
    (L - l layers): steps x (L + 1) / 2 full passes per cell."""
    layer_passes = sum(n_layers - layer for layer in range(n_layers))
    return float(n_cells), n_cells * steps * layer_passes / max(n_layers, 1)


def ig_passes(n_cells: int, steps: int) -> tuple[float, float]:
    """Integrated gradients: steps forward+backward passes per cell (Captum), two forwards for completeness."""
    return 2.0 * n_cells, float(n_cells * steps)


def attribution_parts(stage: str, cfg: dict, n_cells: int, n_layers: int, *, label: str = "") -> list[Part]:
    """Attribution of one model on `n_cells` cells: one part per method."""
    a = cfg["analysis"]
    out = []
    for method in dict.fromkeys(a["attribution"]):
        p = Part(stage, f"attribution {method}{label}", cells=n_cells)
        if method == "hao":
            p.forward, p.gradient = hao_passes(n_cells, int(a["hao_steps"]), n_layers)
        elif method == "ig":
            p.forward, p.gradient_wide = ig_passes(n_cells, int(a["ig_steps"]))
        else:  # rollout: one forward with every layer's attention
            p.forward = float(n_cells)
        out.append(p)
    return out


def deletion_scores(cfg: dict, has_de: bool) -> int:
    """Rankings the deletion deletes from: key score, weight and norm attention, each attribution method, DE."""
    return 3 + len(dict.fromkeys(cfg["analysis"]["attribution"])) + (1 if has_de else 0)


FREQUENCY_SCORES = 2  # summed weight and norm attention: their top genes are the most often detected ones


def deletion_passes(cfg: dict, shape: Shape, n_cells: int, has_de: bool) -> float:
    """Forward passes of one model's deletion: its baseline (each cell once), every (set, affected cell) pair
    of the top-k sets and their matched random sets (matched on detection frequency, so touching as many
    cells), and every single gene of each ranking's top N on the cells expressing it. Which genes are top is
    known only after the analysis: for summed weight and norm attention, which track detection frequency,
    the k most often detected genes; for the other scores k genes each detected in the median share of the
    cells among the genes they rank (1 - (1 - f)^k of the cells hold one)."""
    a = cfg["analysis"]
    n_scores = deletion_scores(cfg, has_de)
    n_freq = min(FREQUENCY_SCORES, n_scores)
    ks = [int(k) for k in a["deletion_k"] if int(k) <= shape.n_genes // 2]
    f = shape.typical_fraction
    per_set = n_freq * sum(shape.deletion_fraction.get(k, 1.0) for k in ks)
    per_set += (n_scores - n_freq) * sum(1.0 - (1.0 - f) ** k for k in ks)
    sets = (1 + int(a["deletion_random_sets"])) * per_set
    top = int(a["deletion_top_genes"])
    singles = min(n_freq * top, shape.n_genes) * shape.single_fraction + (n_scores - n_freq) * top * f
    return float(n_cells) * (1.0 + sets + singles)


def cascade_steps_count(n_layers: int) -> int:
    """The randomisation cascade's steps: the head, each layer top down, the embeddings."""
    return n_layers + 2


def count_stages(cfg: dict, shape: Shape) -> list[Part]:
    """Every stage (and analysis part) of the run, in `pipeline.run.driver._stages` order, with its work."""
    from pipeline.config import analysed_models, analysed_tasks, finetune_stages, model_analysis_on

    mean = shape.mean_length
    n, nl = shape.n_selected, shape.n_layers
    parts: list[Part] = [Part("(start)", "imports, store, summary", fixed_s=ROUGH["start"])]
    data_s = ROUGH["data_cached"] + (0.0 if shape.data_cached else ROUGH["data_per_cell"] * shape.n_obs)
    parts.append(Part("data", cells=n, fixed_s=data_s, note="" if shape.data_cached else "generates the data"))
    model = Part("model", fixed_s=ROUGH["model"])
    if shape.pretrain_cells:
        plen = shape.pretrain_lengths if shape.pretrain_lengths is not None else shape.lengths
        model = Part(
            "model",
            "pretraining",
            cells=shape.pretrain_cells,
            tokens=int(round(shape.pretrain_cells * float(np.mean(plen)))) if len(plen) else 0,
            backward=float(shape.pretrain_cells * shape.pretrain_epochs),
            fixed_s=ROUGH["corpus_per_cell"] * shape.pretrain_cells,
            pretrain=True,
        )
        budget = float(cfg["pretrain"]["time_budget_s"] or 0)
        if budget:
            model.note = f"stops at pretrain.time_budget_s = {budget:g} s"
    parts.append(model)
    tok_s = ROUGH["tokenize"] + (0.0 if shape.tokenization_cached else ROUGH["tokenize_per_cell"] * n)
    parts.append(Part("tokenize", cells=n, tokens=int(round(n * mean)), fixed_s=tok_s))
    umap = bool(cfg["data"]["umap"]) and shape.has_counts
    parts.append(
        Part(
            "record",
            "UMAP" if umap else "",
            cells=n,
            fixed_s=0.2 + ((ROUGH["umap"] + ROUGH["umap_per_cell"] * n) if umap else 0.0),
        )
    )
    epochs = int(cfg["train"]["epochs"])

    def finetune(task: str, mode: str, train_mode: str) -> Part:
        fwd, fb = finetune_passes(train_mode, shape, epochs)
        cells = sum(int(shape.split.get(s, 0)) for s in ("train", "validation", "test"))
        return Part(
            f"finetune {task}/{mode}",
            cells=cells,
            tokens=int(round(cells * mean)),
            forward=fwd,
            backward=fb,
            fixed_s=ROUGH["finetune"],
        )

    for task, mode, permuted in finetune_stages(cfg):
        parts.append(finetune(task, mode + (shape.permuted if permuted else ""), mode))
    analysed = analysed_tasks(cfg)
    comparisons = list(shape.de_comparisons)
    for i, (task, group, reference) in enumerate(comparisons):
        label = "de" if len(comparisons) == 1 else f"de {task}: {group} vs {reference}"
        fixed = (ROUGH["de_first"] if i == 0 else ROUGH["de"]) + ROUGH["de_per_cell"] * n
        parts.append(Part(label, "Wilcoxon" if label != "de" else f"{group} vs {reference}", cells=n, fixed_s=fixed))
    a = cfg["analysis"]
    test = _test_cells(cfg, shape)
    tokens = int(round(test * mean))
    for task in analysed:
        has_de = sum(1 for t, _, _ in comparisons if t == task) == 1
        if model_analysis_on(cfg):  # each model once (`stage_model_analysis`), whatever the pairs comparing it
            for mode in analysed_models(cfg):
                stage = f"model {task}: {mode}"
                parts.append(
                    Part(
                        stage,
                        "attention",
                        cells=test,
                        tokens=tokens,
                        attention_one=float(test),
                        fixed_s=ROUGH["analysis"],
                    )
                )
                for p in attribution_parts(stage, cfg, test, nl) if a["attribution"] else []:
                    p.tokens = tokens
                    parts.append(p)
                if a["deletion"]:
                    parts.append(
                        Part(
                            stage,
                            "deletion",
                            cells=test,
                            tokens=tokens,
                            forward_wide=deletion_passes(cfg, shape, test, has_de),
                            fixed_s=ROUGH["deletion"],
                            note="top sets estimated from detection frequency; skipped for a model that did not learn",
                        )
                    )
                if a["sanity"]:
                    steps = cascade_steps_count(nl) + (1 if a["label_permutation"] else 0)
                    methods = a["attribution"] if a["sanity_attribution"] else []
                    p = Part(stage, "randomisation cascade", cells=test, tokens=tokens)
                    p.attention_one = float(steps * test)
                    for q in attribution_parts(stage, {"analysis": {**a, "attribution": methods}}, test, nl):
                        p.forward += steps * q.forward
                        p.gradient += steps * q.gradient
                        p.gradient_wide += steps * q.gradient_wide
                    p.note = f"{steps} steps"
                    parts.append(p)
        for mode_a, mode_b in a["pairs"]:
            stage = f"attention {task}: {mode_a} vs {mode_b}"
            parts.append(
                Part(
                    stage, "attention", cells=test, tokens=tokens, attention_pair=float(test), fixed_s=ROUGH["analysis"]
                )
            )
    return parts


# -------------------------------------------------------------------------------------------- timing
def representative_lengths(lengths: Sequence[int]) -> list[int]:
    """The smallest, median and largest length (fewer when they coincide)."""
    x = np.asarray(lengths, dtype=np.int64)
    if not len(x):
        return []
    return sorted({int(x.min()), int(np.median(x)), int(x.max())})


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int, budget_s: float = 0.3, warm_up: bool = True) -> float:
    """Median time of `fn` after a warm-up: at least `repeats` runs, more while they fit in `budget_s` (at
    most 20; a loaded machine makes single runs noisy), one for a slow batch, none beyond the warm-up for a
    very slow one. Without `warm_up` (a kind timed after another at the same length, in a running pipeline's
    plan): no warm-up run."""
    if warm_up:
        t0 = time.perf_counter()
        fn()  # warm-up: kernels, allocations, numba compilation
        _sync(device)
        warm = time.perf_counter() - t0
        if warm > 5.0:  # a slow batch: its warm-up is the measurement
            return warm
        if warm > 1.0:
            repeats = 1
    times: list[float] = []
    while len(times) < max(1, repeats) or (sum(times) < budget_s and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))  # what a run sees on this machine as loaded as it is now


def _batches_for(cfg: dict) -> dict[str, int]:
    """Cells per batch of each kind of pass, as the stages run them."""
    b = int(cfg["analysis"]["batch_size"])
    return {
        "forward": b,
        "forward_wide": DELETION_BATCH,
        "backward": int(cfg["train"]["batch_size"]),
        "gradient": b,
        "gradient_wide": b * max(1, int(cfg["analysis"]["ig_steps"])),
        "attention_pair": b,
        "attention_one": b,
    }


def _pass(kind: str, model, other, ids, mask, *, pad_id: int, special_ids: Sequence[int]):
    """One batch of one kind of pass, as a callable (see `time_units`)."""
    import torch

    from pipeline.analysis.attention import analyze_attention

    if kind.startswith("forward"):

        def fn():
            model.eval()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)

    elif kind == "backward":
        labels = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)

        def fn():
            model.train()
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)

    elif kind.startswith("gradient"):
        params = list(model.parameters())

        def fn():
            model.eval()
            for p in params:
                p.requires_grad_(False)
            try:
                emb = model.bert.embeddings.word_embeddings(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, attention_mask=mask).logits
                torch.autograd.grad(logits[:, 0].sum(), emb)
            finally:
                for p in params:
                    p.requires_grad_(True)

    else:
        cells = {"input_ids": ids.cpu().tolist()}
        pair = kind == "attention_pair"

        def fn():
            analyze_attention(
                model,
                other if pair else None,
                cells,
                pad_id=pad_id,
                special_ids=special_ids,
                batch_size=ids.shape[0],
                device=ids.device,
                dtype=torch.float32,
                cell_curves=pair,
            )

    return fn


def time_units(
    model,
    lengths: Sequence[int],
    *,
    batches: dict[str, int],
    device="cpu",
    pad_id: int = 0,
    special_ids: Sequence[int] = (),
    repeats: int = 2,
    seed: int = 0,
    say=None,
    quick: bool = False,
) -> dict:
    """Seconds per cell of each kind of pass at the representative lengths: {"lengths": [...], kind: [...]}.

    `model`: a `BertForSequenceClassification` (random weights do); it is moved to `device`. `batches`: kind ->
    cells per batch (fewer when a batch would exceed `TIMING_TOKENS` tokens), of random non-special token ids.
    Kinds: forward (eval, no gradients), forward+backward (train mode, parameter gradients), gradient
    (parameters frozen, the gradient of the logits wrt the embeddings: attribution's passes), the streaming
    attention engine on a pair and on one model. Each is timed after one warm-up, the median of `repeats` or
    more runs (`_timed`). `quick` (a running pipeline's plan, whose ETAs need less precision than `--plan`):
    one warm-up per length and `repeats` runs of each kind, so that the plan costs a small part of the run.
    """
    import copy

    import torch

    device = torch.device(device)
    model = model.to(device)
    config = model.config
    vocab = int(config.vocab_size)
    low = max([int(pad_id), *[int(s) for s in special_ids]]) + 1
    gen = np.random.default_rng(seed)
    out: dict[str, list] = {"lengths": representative_lengths(lengths)}
    kinds = [k for k in KINDS if k in batches]
    for kind in kinds:
        out[kind] = []
    other = copy.deepcopy(model) if "attention_pair" in kinds else None
    for length in out["lengths"]:
        length = min(int(length), int(config.max_position_embeddings))
        if say is not None:
            say(f"timing the model at {length} tokens")
        seen: dict[tuple[str, int], float] = {}
        for kind in kinds:
            b = max(1, min(int(batches[kind]), TIMING_TOKENS // max(length, 1)))
            base = kind.removesuffix("_wide")
            if (base, b) in seen:  # the wide batch is capped to the plain one's size: the same measurement
                out[kind].append(seen[(base, b)])
                continue
            ids = torch.as_tensor(gen.integers(low, max(vocab, low + 1), size=(b, length)), device=device)
            mask = torch.ones(b, length, dtype=torch.long, device=device)
            fn = _pass(kind, model, other, ids, mask, pad_id=pad_id, special_ids=special_ids)
            warm_up = not quick or not seen
            out[kind].append(_timed(fn, device, repeats, budget_s=0.0 if quick else 0.3, warm_up=warm_up) / b)
            seen[(kind, b)] = out[kind][-1]
    model.eval()
    return out


def unit_costs(timing: dict, lengths: Sequence[int]) -> dict[str, float]:
    """Mean seconds per cell of each timed kind over cells of these lengths (linear in between the timed
    lengths, constant beyond them)."""
    x = np.asarray(lengths, dtype=np.float64)
    ref = np.asarray(timing["lengths"], dtype=np.float64)
    out = {}
    for kind in KINDS:
        if kind in timing and len(ref) and len(x):
            out[kind] = float(np.mean(np.interp(x, ref, np.asarray(timing[kind], dtype=np.float64))))
        else:
            out[kind] = 0.0
    return out


def estimate(parts: list[Part], units: dict[str, float], pretrain_units: dict[str, float] | None = None) -> float:
    """Fill in each part's seconds (passes x per-cell cost + its rough allowance); returns the total."""
    for p in parts:
        u = pretrain_units if (p.pretrain and pretrain_units) else units
        p.seconds = p.fixed_s + sum(getattr(p, kind) * u.get(kind, 0.0) for kind in KINDS)
    return float(sum(p.seconds for p in parts))


def stage_estimates(plan: dict) -> dict[str, float]:
    """Seconds per stage name (parts summed): what a running stage's ETA starts from."""
    out: dict[str, float] = {}
    for row in plan.get("stages", []):
        out[row["stage"]] = out.get(row["stage"], 0.0) + float(row.get("seconds") or 0.0)
    return out


# ------------------------------------------------------------------------------------------ the shape
def deletion_shape(
    token_lists: Sequence[Sequence[int]], special_ids: Sequence[int], ks: Sequence[int], top: int, min_cells: int = 1
):
    """(fraction of cells holding one of the k most frequent genes per k, mean fraction holding one of the
    `top` most frequent genes, distinct genes, median fraction of cells holding a gene held by at least
    `min_cells` cells) over the cells' token lists."""
    special = {int(s) for s in special_ids}
    n = len(token_lists)
    sets = [set(int(t) for t in x) - special for x in token_lists]
    counts: dict[int, int] = {}
    for s in sets:
        for t in s:
            counts[t] = counts.get(t, 0) + 1
    order = sorted(counts, key=lambda t: (-counts[t], t))
    fractions = {}
    for k in ks:
        top_k = set(order[: int(k)])
        fractions[int(k)] = sum(1 for s in sets if s & top_k) / n if n else 0.0
    chosen = order[: max(int(top), 1)]
    single = float(np.mean([counts[t] for t in chosen]) / n) if (n and chosen) else 0.0
    eligible = [c for c in counts.values() if c >= int(min_cells)]
    typical = float(np.median(eligible) / n) if (n and eligible) else 0.0
    return fractions, single, len(counts), typical


def build_shape(
    cfg: dict,
    *,
    n_obs: int,
    split: np.ndarray,
    lengths: np.ndarray,
    token_lists: Sequence[Sequence[int]],
    special_ids: Sequence[int],
    n_layers: int,
    de_comparisons: list,
    pretrain_cells: int = 0,
    data_cached: bool = True,
    tokenization_cached: bool = False,
    permuted: str = " (permuted labels)",
) -> Shape:
    a = cfg["analysis"]
    from pipeline.analysis.keygenes import min_cells_for

    fractions, single, n_genes, typical = deletion_shape(
        token_lists,
        special_ids,
        a["deletion_k"],
        FREQUENCY_SCORES * int(a["deletion_top_genes"]),
        min_cells=min_cells_for(len(token_lists)),
    )
    p = cfg["pretrain"]
    return Shape(
        n_obs=int(n_obs),
        n_selected=int(len(split)),
        split={s: int((np.asarray(split) == s).sum()) for s in ("train", "validation", "test")},
        lengths=np.asarray(lengths, dtype=np.int64),
        n_layers=int(n_layers),
        de_comparisons=list(de_comparisons),
        pretrain_cells=int(pretrain_cells),
        pretrain_epochs=int(p["epochs"]),
        pretrain_lengths=np.minimum(np.asarray(lengths, dtype=np.int64), int(p["max_len"])),
        data_cached=data_cached,
        tokenization_cached=tokenization_cached,
        has_counts=not cfg["data"]["tokenized"],
        permuted=permuted,
        deletion_fraction=fractions,
        single_fraction=single,
        typical_fraction=typical,
        n_genes=n_genes,
    )


def shard_model_stages(parts: list[Part], processes: int) -> None:
    """A sharded analysis (`pipeline.parallel.analyse`): each model stage's passes shared by `processes`
    (in place). The processes start once per run, when the cells are tokenized, beside the stages before the
    first model stage: what of their start those stages do not cover is a part of the first model stage."""
    _share_stages(parts, "model ", processes)


def share_finetune_stages(parts: list[Part], processes: int) -> None:
    """Data-parallel fine-tuning (`compute.nproc`, `pipeline.parallel.launch.JobWorkers`): each fine-tuning
    stage's passes shared by `processes` (in place). The processes start once per run, when the cells are
    tokenized, beside the record stage: what of their start it does not cover is a part of the first
    fine-tuning stage."""
    _share_stages(parts, "finetune ", processes)


def _share_stages(parts: list[Part], prefix: str, processes: int) -> None:
    """Every stage named `prefix...`: its passes shared by `processes`, plus what of the processes' start
    (begun when the cells are tokenized) the stages between tokenization and the first such stage do not
    cover, as a part of that stage (in place)."""
    if processes <= 1:
        return
    first = next((i for i, p in enumerate(parts) if p.stage.startswith(prefix)), None)
    if first is None:
        return
    for p in parts[first:]:
        if p.stage.startswith(prefix):
            p.seconds = p.fixed_s + (p.seconds - p.fixed_s) / processes
    tokenized = max((i for i, p in enumerate(parts[:first]) if p.stage == "tokenize"), default=-1)
    before = sum(p.seconds for p in parts[tokenized + 1 : first])
    start = max(0.0, ROUGH["processes"] - before)
    parts.insert(
        first, Part(parts[first].stage, f"start of {processes} processes (torchrun)", fixed_s=start, seconds=start)
    )


def make_plan(
    cfg: dict,
    shape: Shape,
    model,
    *,
    device,
    dicts=None,
    extra: dict | None = None,
    say=None,
    repeats: int = 2,
    quick: bool = False,
) -> dict:
    """Time the model at the shape's lengths, count and estimate every stage: the plan as a JSON-able dict.
    The timing runs on forked random generators: the run's own draws are not moved by it."""
    import torch

    from pipeline.compute import pin_threads

    t0 = time.perf_counter()
    threads = pin_threads(int(cfg["compute"]["threads"]) or None)
    pad_id = int(getattr(dicts, "pad_id", 0) or 0) if dicts is not None else 0
    special = sorted(int(s) for s in getattr(dicts, "special_ids", ()) or ()) if dicts is not None else []
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        timing = time_units(
            model,
            shape.lengths,
            batches=_batches_for(cfg),
            device=device,
            pad_id=pad_id,
            special_ids=special,
            seed=int(cfg["run"]["seed"]),
            say=say,
            repeats=repeats,
            quick=quick,
        )
    parts = count_stages(cfg, shape)
    units = unit_costs(timing, shape.lengths)
    p_units = unit_costs(timing, shape.pretrain_lengths) if shape.pretrain_lengths is not None else None
    total = estimate(parts, units, p_units)
    budget = float(cfg["pretrain"]["time_budget_s"] or 0)
    for p in parts:
        if p.pretrain and budget and p.seconds > budget + p.fixed_s:
            p.seconds = budget + p.fixed_s
    share_finetune_stages(parts, int(cfg["compute"]["nproc"]))
    shard_model_stages(parts, analysis_processes(cfg))
    total = float(sum(p.seconds for p in parts))
    c = model.config
    lengths = shape.lengths
    return {
        "version": PLAN_VERSION,
        "preset": cfg["run"]["preset"],
        "device": str(getattr(device, "type", device)),
        "threads": int(threads),
        "analysis_processes": analysis_processes(cfg),
        "model": {
            "layers": int(c.num_hidden_layers),
            "hidden": int(c.hidden_size),
            "heads": int(c.num_attention_heads),
            "positions": int(c.max_position_embeddings),
            **(extra or {}),
        },
        "cells": {"selected": shape.n_selected, **shape.split, "analysed": _test_cells(cfg, shape)},
        "lengths": {
            "cells": int(len(lengths)),
            "median": float(np.median(lengths)) if len(lengths) else 0.0,
            "max": int(lengths.max()) if len(lengths) else 0,
        },
        "timing": {**timing, "unit": "seconds per cell"},
        "stages": [{k: v for k, v in asdict(p).items() if k != "pretrain"} for p in parts],
        "total_s": total,
        "planning_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------- entry points
def timing_model(config, n_labels: int, seed: int):
    """A `BertForSequenceClassification` with the architecture of `config` and random weights."""
    import copy

    import torch
    from transformers import BertForSequenceClassification

    config = copy.deepcopy(config)
    config.num_labels = max(int(n_labels), 2)
    config.architectures = ["BertForSequenceClassification"]
    config._attn_implementation = "sdpa"
    from pipeline.models.load import _quiet_transformers

    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(int(seed))
        return BertForSequenceClassification(config)


def plan_in_run(ctx, comparisons: list, permuted: str) -> dict:
    """The plan of a running pipeline, once its cells are tokenized: exact lengths, the run's own model.
    `comparisons`: its DE comparisons (`experiment.de_comparisons`); `permuted`: `experiment.PERMUTED`."""
    from pipeline.models.load import read_model_config

    cfg = ctx.cfg
    ds = ctx.out.dataset
    lists = [list(x) for x in ds["input_ids"]]
    lengths = np.asarray(ds["length"], dtype=np.int64)
    config = read_model_config(ctx.out.model_dir)
    sel = ctx.out.selection
    pretrained = bool(ctx.out.pretrain_metrics)
    cells = 0
    if pretrained:
        cells = int(cfg["pretrain"]["corpus_cells"]) + int(cfg["pretrain"].get("lineage_cells", 0))
        if cfg["data"]["path"]:
            cells = int((np.asarray(ctx.out.split) == "train").sum())
    shape = build_shape(
        cfg,
        n_obs=int(ctx.preflight.obs_rows if ctx.preflight is not None else len(lengths)) or len(lengths),
        split=ctx.out.split,
        lengths=lengths,
        token_lists=lists,
        special_ids=sorted(ctx.out.dicts.special_ids),
        n_layers=int(config.num_hidden_layers),
        de_comparisons=comparisons,
        pretrain_cells=cells,
        tokenization_cached=True,
        permuted=permuted,
    )
    n_labels = max((len(v) for v in sel.names.values()), default=2)
    model = timing_model(config, n_labels, ctx.seed)
    return make_plan(
        cfg,
        shape,
        model,
        device=ctx.device,
        dicts=ctx.out.dicts,
        repeats=1,
        quick=str(ctx.device) == "cpu",  # a GPU's first call of each kind warms up kernels and handles
        extra={"source": str(ctx.out.model_dir), "input_size": int(ctx.out.max_len), "sampled_cells": len(lengths)},
    )


# ----------------------------------------------------------------------------------------- rendering
def _duration(s: float) -> str:
    s = float(s)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _count(x: float) -> str:
    if not x:
        return "-"
    x = float(x)
    if x >= 1e6:
        return f"{x / 1e6:.1f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    return f"{x:.0f}"


def format_plan(plan: dict) -> list[str]:
    """The plan as lines of text: what runs, its work and its estimated time, stage by stage."""
    m, c, ln = plan.get("model", {}), plan.get("cells", {}), plan.get("lengths", {})
    lines = [
        f"plan of a {plan.get('preset', '')} run on {plan.get('device', '?')} ({plan.get('threads', '?')} threads):"
        f" {c.get('selected', 0)} cells (train {c.get('train', 0)} / validation {c.get('validation', 0)}"
        f" / test {c.get('test', 0)}, {c.get('analysed', 0)} analysed), length median"
        f" {ln.get('median', 0):.0f}, max {ln.get('max', 0)}"
        + (
            f"; each model analysed in {plan['analysis_processes']} processes"
            if int(plan.get("analysis_processes") or 1) > 1
            else ""
        ),
        f"model: {m.get('layers')} layers x {m.get('hidden')} hidden, {m.get('heads')} heads, input size"
        f" {m.get('input_size', m.get('positions'))}; {m.get('source', '')}",
    ]
    t = plan.get("timing", {})
    if t.get("lengths"):
        per = []
        for kind in KINDS:
            if t.get(kind):
                values = ", ".join(f"{v * 1e3:.3g}" for v in t[kind])
                per.append(f"{KIND_LABELS[kind]} {values}")
        lines.append(f"timed, ms per cell at {', '.join(str(x) for x in t['lengths'])} tokens: " + "; ".join(per))
    lines.append("")
    head = f"{'stage / part':<46} {'cells':>6} {'tokens':>7} {'fwd':>7} {'fwd+bwd':>8} {'attn':>6} {'estimate':>9}"
    lines.append(head)
    lines.append("-" * len(head))
    rows = plan.get("stages", [])
    per_stage = stage_estimates(plan)
    n_parts: dict[str, int] = {}
    for row in rows:
        n_parts[row["stage"]] = n_parts.get(row["stage"], 0) + 1
    last = None
    for row in rows:
        stage = row["stage"]
        if n_parts[stage] > 1:
            if stage != last:
                lines.append(f"{stage[: 46 + 48]:<{46 + 48 - 10}} {_duration(per_stage[stage]):>9}")
            label = f"  {row['part']}"
        else:
            label = f"{stage}: {row['part']}" if row.get("part") else stage
        last = stage
        attn = float(row.get("attention_pair", 0)) + float(row.get("attention_one", 0))
        fwd = float(row.get("forward", 0)) + float(row.get("forward_wide", 0))
        fb = sum(float(row.get(k, 0)) for k in ("backward", "gradient", "gradient_wide"))
        model_work = fwd or fb or attn
        rough = "~" if (not model_work and row.get("fixed_s")) else " "
        est = f"{rough}{_duration(row.get('seconds', 0))}"
        lines.append(
            f"{label[:46]:<46} {_count(row.get('cells', 0)):>6} {_count(row.get('tokens', 0)):>7}"
            f" {_count(fwd):>7} {_count(fb):>8} {_count(attn):>6} {est:>9}"
            + (f"  ({row['note']})" if row.get("note") else "")
        )
    lines.append("-" * len(head))
    lines.append(
        f"estimated total: {_duration(plan.get('total_s', 0))} on this device "
        f"(planned in {plan.get('planning_s', 0):.1f} s; ~ marks library work estimated, not timed)"
    )
    lines.append("passes are cells through the whole model; attn: cells through the streaming attention engine")
    return lines


def record_plan(ctx, comparisons: list, permuted: str) -> dict | None:
    """Make the running pipeline's plan, store it on the run (`results.JSON_PLAN`) and hand its per-stage
    estimates to the progress reporter (ETAs from a stage's first update); a resumed run keeps the plan it
    stored when it started. A plan that cannot be made is a warning line, never a failed run."""
    from store import results as R

    if R.JSON_PLAN in ctx.store.json_names(ctx.run_id):  # resumed: the plan made when the run started
        plan = ctx.store.get_json(ctx.run_id, R.JSON_PLAN)
        ctx.rep.estimates = stage_estimates(plan)
        ctx.rep.line(f"plan: about {_duration(plan['total_s'])} in all on {plan['device']}, made when the run started")
        return plan
    try:
        plan = plan_in_run(ctx, comparisons, permuted)
    except Exception as exc:  # the plan is advice: the run goes on without it
        ctx.rep.line(f"no cost plan ({type(exc).__name__}: {exc})", level="warning")
        return None
    ctx.store.put_json(ctx.run_id, R.JSON_PLAN, plan)
    ctx.rep.estimates = stage_estimates(plan)
    ctx.rep.line(f"plan: about {_duration(plan['total_s'])} in all on {plan['device']} (`gfattn pipeline --plan`)")
    return plan
