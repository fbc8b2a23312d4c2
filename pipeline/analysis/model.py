"""One model's analysis as one unit of work: its own attention pass (the gene table its rankings come
from), attribution, deletion and the randomisation cascade, computed from a checkpoint and the analysis
cells, returned as a `ModelAnalysis`; the run's recorder (`pipeline.run.stages.analysis`) stores it.

Every part is a function of the model, the cells, the configuration and the seed, never of the pair a
model is compared in. In a process group (torchrun, `pipeline.parallel.analyse`) each part shards its
batches over the ranks (the same list, shared out by padded tokens: `pipeline.parallel.distributed.share`):
per-cell values and deletion logits are gathered, so they equal one process's; sums over cells are
all-reduced in float64, so they agree with one process's to rounding (relative 1e-12;
docs/architecture.md, "Sharded analysis"). Random sets, bootstrap and re-initialisation draw from the run's
seed on every rank alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

# The model analysis's own gene table is a one-model table: its columns end in "_a".
MODEL_SUFFIX = "a"


@dataclass
class ModelAnalysis:
    """What `analyse_model` returns: the model's gene table (columns `_a`), its `AttributionResult`,
    `DeletionResult` and randomisation-cascade document (None where not computed), and the process count."""

    genes: pd.DataFrame
    attribution: object | None = None
    deletion: object | None = None
    sanity: dict | None = None
    world_size: int = 1
    meta: dict = field(default_factory=dict)


def _labels(cells) -> np.ndarray:
    return np.asarray(cells["label"], dtype=np.int64)


def analyse_model(
    model_path,
    cells,
    *,
    dicts,
    analysis: dict,
    de: pd.DataFrame | None,
    seed: int,
    device,
    deletion: bool = True,
    sanity: bool = True,
    permuted_path=None,
    progress: Callable | None = None,
) -> ModelAnalysis:
    """The analysis of the fine-tuned classifier at `model_path` on `cells` (a tokenized dataset or dict of
    columns with `input_ids`, `label`, `group_name`): `analysis` is the run's `[analysis]` section;
    `deletion` / `sanity` say whether those parts run (the gate decides before); `permuted_path`: the
    same model fine-tuned on permuted labels, scored beside the cascade. `progress(done, total, unit=...)`."""
    from pipeline.analysis.pair import model_gene_table
    from pipeline.models.load import load_for_attention
    from pipeline.parallel.distributed import shard

    def report(unit):
        if progress is None:
            return None
        return lambda done, total, **kw: progress(done, total, unit=unit, **kw)

    model = load_for_attention(model_path)  # attention, attribution and deletion leave the weights as they are
    genes = model_gene_table(
        model,
        cells,
        dicts=dicts,
        batch_size=analysis["batch_size"],
        device=device,
        group_column="group_name",
        progress=report("cells"),
    )
    out = ModelAnalysis(genes=genes, world_size=shard()[1])
    out.attribution = _attribution(model, cells, dicts, analysis, seed, device, report("cells"))
    if deletion and analysis["deletion"]:
        out.deletion = _deletion(model, cells, genes, out.attribution, dicts, de, analysis, seed, device)
    del model
    if sanity and analysis["sanity"]:
        out.sanity = _sanity(
            model_path, permuted_path, cells, genes, out.attribution, dicts, analysis, seed, device, report
        )
    return out


def _attribution(model, cells, dicts, analysis, seed, device, progress):
    methods = tuple(analysis["attribution"])
    if not methods:
        return None
    from pipeline.analysis.attribution import run_attribution
    from pipeline.tokenize.cells import Cells

    return run_attribution(
        model,
        Cells(cells),
        _labels(cells),
        methods=methods,
        dicts=dicts,
        hao_steps=int(analysis["hao_steps"]),
        ig_steps=int(analysis["ig_steps"]),
        ig_max_steps=int(analysis["ig_max_steps"]),
        ig_gap_p95=float(analysis["ig_gap_p95"]),
        batch_size=int(analysis["batch_size"]),
        device=device,
        seed=seed,
        progress=progress,
    )


def _deletion(model, cells, genes, attribution, dicts, de, analysis, seed, device):
    """In-silico deletion of the model's top genes by every score (and of matched random sets), and
    single-gene deletion of each score's top genes (`pipeline.analysis.deletion_report.run_deletion`)."""
    from pipeline.analysis.deletion_report import run_deletion

    return run_deletion(
        model,
        cells,
        _labels(cells),
        genes=genes,
        suffix=MODEL_SUFFIX,
        attribution=attribution,
        de=de,
        dicts=dicts,
        ks=tuple(int(k) for k in analysis["deletion_k"]),
        n_random=int(analysis["deletion_random_sets"]),
        max_random=int(analysis["deletion_max_random_sets"]),
        match_pool=int(analysis["deletion_match_pool"]),
        top_genes=int(analysis["deletion_top_genes"]),
        null_bins=tuple(analysis["null_bins"]),
        n_boot=int(analysis["n_boot"]),
        device=device,
        seed=seed,
    )


def _sanity(model_path, permuted_path, cells, genes, attribution, dicts, analysis, seed, device, report) -> dict:
    """Cascading randomisation (Adebayo et al. 2018): how the key-gene scores change as the head, then the
    layers top down, then the embeddings are re-initialised; and the label-permuted model's scores."""
    from pipeline.analysis.attribution import attribution_gene_table
    from pipeline.analysis.keygenes import min_cells_for
    from pipeline.analysis.sanity import ATTENTION_SCORES, FLAG_RHO, randomisation_cascade
    from pipeline.models.load import load_for_attention

    labels = _labels(cells)
    methods = tuple(analysis["attribution"]) if analysis["sanity_attribution"] else ()
    suffix = MODEL_SUFFIX
    trained = genes.set_index("ensembl_id")[["symbol", "n_cells", *[f"{c}_{suffix}" for c in ATTENTION_SCORES]]]
    trained = trained.rename(columns={f"{c}_{suffix}": c for c in ATTENTION_SCORES})
    if attribution is not None:
        table = attribution_gene_table(attribution, dicts.id_to_gene).set_index("ensembl_id")
        trained = trained.join(table[[f"{m}_mean" for m in methods]], how="left")
    scoring = dict(
        dicts=dicts,
        methods=methods if attribution is not None else (),
        hao_steps=int(analysis["hao_steps"]),
        ig_steps=int(analysis["ig_steps"]),
        batch_size=int(analysis["batch_size"]),
        device=device,
        seed=seed,
    )
    doc = randomisation_cascade(
        load_for_attention(model_path),  # re-initialised in place: a copy of its own
        cells,
        labels,
        min_cells=min_cells_for(len(labels)),
        trained_scores=trained,
        progress=report("randomisation steps"),
        **scoring,
    )
    if permuted_path is not None:
        from pipeline.analysis.sanity import compare_scores, key_gene_scores

        scores = key_gene_scores(load_for_attention(permuted_path), cells, labels, **scoring)
        doc["label_permutation"] = compare_scores(trained, scores, min_cells=min_cells_for(len(labels)))
        doc["label_permutation_flagged"] = [
            c for c, v in doc["label_permutation"].items() if (v.get("spearman") or 0.0) >= FLAG_RHO
        ]
    return doc
