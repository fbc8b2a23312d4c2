"""In-silico deletion as an analysis of the pipeline: which gene sets to delete, and what is stored.

`pipeline.analysis.deletion` is the engine (deleting token sets from cells and measuring the classifier's
prediction); this module decides what the key-gene question needs from it and writes the answer:

- **Rankings** of one model's genes by every score the analysis has (`score_rankings`): the controlled
  key score, summed weight attention, norm attention, each attribution method's per-occurrence score
  (genes in at least `min_cells` cells, as the attribution's own top genes), and Wilcoxon DE (up in the
  tested group first).
- **Set deletion** of each ranking's top k genes from every test cell, beside `n_random` random gene sets
  matched to each top-k set on detection frequency x mean rank (the bins of `pipeline.analysis.keygenes`), with
  bootstrap CIs over cells and the empirical p that the score's set hurts at least as much as its
  matched random sets (`pipeline.analysis.deletion.set_deletion`).
- **Single-gene deletion** of each ranking's top N genes (`pipeline.analysis.deletion.single_gene_effects`): the
  mean change of the true-class logit over the cells expressing the gene, with its CI.

Stored (names in `store.results`): JSON `deletion_<model>` (the top-k rows with their matched-random
mean, 2.5-97.5% band and p, every random set's mean, and the Spearman correlations with detection
frequency of the key score and of the deletion effects); gene table `deletion_<model>` (single-gene
effects, with the scores whose top N hold the gene); and the analysis gene table's
`deletion_logit_<s>`, `deletion_logit_low_<s>`, `deletion_logit_high_<s>`, `deletion_prob_<s>` columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

HEADLINE_K = 20


@dataclass
class DeletionResult:
    sets: pd.DataFrame  # pipeline.analysis.deletion.SET_COLUMNS, one row per (score, k, set)
    single: pd.DataFrame  # pipeline.analysis.deletion.SINGLE_COLUMNS plus `top_of`
    rankings: dict[str, np.ndarray]
    n_cells: int
    ks: tuple[int, ...]
    n_random: int
    meta: dict = field(default_factory=dict)


def score_rankings(
    genes: pd.DataFrame, suffix: str, *, attribution=None, de: pd.DataFrame | None = None, dicts=None, min_cells: int
) -> dict[str, np.ndarray]:
    """Token ids of the analysed genes ranked best first, per score (see the module docstring)."""
    out: dict[str, np.ndarray] = {}
    for name, col in (
        ("key_score", f"key_score_{suffix}"),
        ("attn", f"attn_{suffix}"),
        ("attn_norm", f"attn_norm_{suffix}"),
    ):
        if col in genes.columns:
            ranked = genes.dropna(subset=[col]).sort_values(col, ascending=False, kind="stable")
            out[name] = ranked["token_id"].to_numpy(dtype=np.int64)
    if attribution is not None:
        from pipeline.analysis.attribution import attribution_gene_table

        table = attribution_gene_table(attribution, dicts.id_to_gene)
        table = table[table["n_cells"] >= int(min_cells)]
        for m in attribution.methods:
            ranked = table.dropna(subset=[f"{m}_mean"]).sort_values(f"{m}_mean", ascending=False, kind="stable")
            out[m] = ranked["token_id"].to_numpy(dtype=np.int64)
    if de is not None and len(de) and "score" in de.columns:
        token = dict(zip(genes["ensembl_id"].astype(str), genes["token_id"].astype(np.int64)))
        ranked = de.dropna(subset=["score"]).sort_values("score", ascending=False, kind="stable")
        out["de"] = np.asarray([token[e] for e in ranked["ensembl_id"].astype(str) if e in token], dtype=np.int64)
    return out


def run_deletion(
    model,
    cells,
    labels,
    *,
    genes: pd.DataFrame,
    suffix: str,
    dicts,
    attribution=None,
    de: pd.DataFrame | None = None,
    ks: Sequence[int] = (1, 5, 10, 20, 50),
    n_random: int = 20,
    max_random: int | None = None,
    match_pool: int = 10,
    top_genes: int = 50,
    null_bins: Sequence[int] = (5, 5),
    n_boot: int = 200,
    batch_size: int = 64,
    device="cpu",
    seed: int = 0,
) -> DeletionResult:
    """Set and single-gene deletion of one model on `cells` (its analysis gene table: `genes`).

    Random sets are matched gene by gene (`pipeline.analysis.deletion.nearest_matched_sets`, the `match_pool`
    nearest genes) on cells expressing and mean rank; the token the classifier reads (position 0) is never
    deleted (`DeletionEngine(keep_read_position=True)`), so top and random sets match on it exactly;
    `n_random` of them per test, raised up to `max_random` while p sits at its floor (None: no raise).
    `null_bins` is recorded (the overlaps' matched null uses it); deletion no longer bins."""
    from pipeline.analysis.deletion import DeletionEngine, matching_features, set_deletion, single_gene_effects
    from pipeline.analysis.keygenes import min_cells_for

    n = len(labels)
    rankings = score_rankings(genes, suffix, attribution=attribution, de=de, dicts=dicts, min_cells=min_cells_for(n))
    engine = DeletionEngine(
        model,
        cells,
        labels,
        pad_id=dicts.pad_id,
        special_ids=dicts.special_ids,
        batch_size=batch_size,
        device=device,
        keep_read_position=True,
    )
    candidates = genes["token_id"].to_numpy(dtype=np.int64)
    features = matching_features(genes["n_cells"].to_numpy(), genes["rank_mean"].to_numpy())
    ks = tuple(int(k) for k in ks if int(k) <= len(candidates) // 2)
    sets = set_deletion(
        engine,
        rankings,
        ks,
        candidates=candidates,
        features=features,
        match_pool=match_pool,
        n_random=n_random,
        max_random=max_random,
        n_boot=n_boot,
        seed=seed,
    )
    chosen: dict[int, list[str]] = {}
    for name, ranked in rankings.items():
        for t in ranked[: int(top_genes)].tolist():
            chosen.setdefault(int(t), []).append(name)
    tokens = np.asarray(list(chosen), dtype=np.int64)
    single = single_gene_effects(engine, tokens, n_boot=n_boot, seed=seed) if len(tokens) else pd.DataFrame()
    if len(single):
        single["top_of"] = [",".join(chosen[int(t)]) for t in single["token_id"]]
    return DeletionResult(
        sets=sets,
        single=single,
        rankings=rankings,
        n_cells=int(n),
        ks=ks,
        n_random=int(n_random),
        meta={
            "top_genes": int(top_genes),
            "null_bins": [int(b) for b in null_bins],
            "seed": int(seed),
            "max_random": int(max_random if max_random is not None else n_random),
            "matching": {
                "method": "gene by gene: each random gene drawn from the genes nearest to a top gene",
                "features": ["log2 cells expressing (tokens removed)", "mean rank"],
                "pool": int(match_pool),
                "read_position": "never deleted: the token the classifier reads (position 0: <cls>, or without"
                " <cls> the cell's first gene) stays in every cell for the top and the random sets alike",
            },
        },
    )


def _frequency_spearman(genes: pd.DataFrame, single: pd.DataFrame, suffix: str) -> dict:
    """Spearman with detection frequency: the key score over every scored gene and over the genes deleted
    one at a time, and the deletion effect (minus the logit change: larger = the model uses it more)."""
    from scipy.stats import spearmanr

    def rho(x, y):
        ok = np.isfinite(x) & np.isfinite(y)
        return float(spearmanr(x[ok], y[ok])[0]) if ok.sum() >= 3 and np.ptp(x[ok]) > 0 else None

    key = f"key_score_{suffix}"
    out = {"key_score": rho(genes[key].to_numpy(float), genes["n_cells"].to_numpy(float))}
    if len(single):
        merged = single.merge(genes[["token_id", "n_cells", key]], on="token_id")
        freq = merged["n_cells"].to_numpy(float)
        out["deletion_effect"] = rho(-merged["delta_logit_mean"].to_numpy(float), freq)
        out["key_score_same_genes"] = rho(merged[key].to_numpy(float), freq)
        out["n_genes_deleted"] = int(len(merged))
    return out


def deletion_records(result: DeletionResult, *, model_name: str, suffix: str, genes: pd.DataFrame):
    """One model's deletion results as `store.records.Records` (see the module docstring; the JSON document
    under `json_deletion`); adds the single-gene columns to `genes` in place (the caller stores the table)."""
    from store import results as R
    from store.jsonsafe import plain
    from store.records import Records

    rec = Records()

    sets = result.sets
    top = sets[sets["set"] == "top"]
    random = sets[sets["set"] != "top"]
    rows, random_means = [], {}
    for r in top.itertuples(index=False):
        values = random[(random["score"] == r.score) & (random["k"] == r.k)]["delta_prob_mean"].to_numpy(float)
        random_means.setdefault(r.score, {})[str(r.k)] = values.tolist()
        row = r._asdict()
        row.pop("set", None)
        for key, kind in (("p_at_floor", bool), ("n_random", int)):  # NaN on random rows: float/object columns
            v = row.get(key)
            row[key] = None if v is None or (isinstance(v, float) and np.isnan(v)) else kind(v)
        row["random_delta_prob_low"] = float(np.percentile(values, 2.5)) if len(values) else None
        row["random_delta_prob_high"] = float(np.percentile(values, 97.5)) if len(values) else None
        rows.append(row)
    single = result.single
    if len(single):
        ids = dict(zip(genes["token_id"].astype(np.int64), genes["ensembl_id"].astype(str)))
        symbols = dict(zip(genes["token_id"].astype(np.int64), genes["symbol"].astype(str)))
        table = single.copy()
        table.insert(0, "symbol", [symbols.get(int(t), "") for t in table["token_id"]])
        table.insert(0, "ensembl_id", [ids.get(int(t), f"token_{int(t)}") for t in table["token_id"]])
        rec.put_gene_table(R.table_deletion(model_name), table)
        by_token = single.set_index("token_id")
        t = genes["token_id"].astype(np.int64)
        genes[R.col_deletion_logit(suffix)] = t.map(by_token["delta_logit_mean"]).astype(float)
        genes[R.col_deletion_logit(suffix) + "_low"] = t.map(by_token["delta_logit_ci_low"]).astype(float)
        genes[R.col_deletion_logit(suffix) + "_high"] = t.map(by_token["delta_logit_ci_high"]).astype(float)
        genes[R.col_deletion_prob(suffix)] = t.map(by_token["delta_prob_mean"]).astype(float)
    deletion_q_values(rows)
    k = HEADLINE_K if HEADLINE_K in result.ks else (max(result.ks) if result.ks else None)
    parts = []
    for row in rows:
        if row["k"] == k and row["score"] in ("key_score", "attn", "de"):
            parts.append(
                f"{row['score']} {row['delta_prob_mean']:+.3f} vs matched random "
                f"{row['random_delta_prob_mean']:+.3f}{p_text(row, sep=', ')}"
            )
    headline = (
        f"change of the true-class probability when the top {k} genes are deleted: " + "; ".join(parts)
        if parts
        else "no gene set deleted"
    )
    doc = plain(
        {
            "model": model_name,
            "n_cells": result.n_cells,
            "ks": list(result.ks),
            "n_random": result.n_random,
            "scores": list(result.rankings),
            "accuracy_before": float(top["accuracy_before"].iloc[0]) if len(top) else None,
            "sets": rows,
            "random_delta_prob": random_means,
            "single_genes": int(len(single)),
            "top_tokens": {k: v[: int(result.meta.get("top_genes", 0))].tolist() for k, v in result.rankings.items()},
            "frequency_spearman": _frequency_spearman(genes, single, suffix),
            "headline": headline,
            "p_definition": "p = (1 + #{random sets whose mean change is <= the set's}) / (1 + R); at its floor"
            " (no random set as harmful) it reads p <= 1/(R+1); R raised while p sits at its floor, up to max_random;"
            " z = (set - mean of random) / sd of random",
            **result.meta,
        }
    )
    rec.put_json(R.json_deletion(model_name), doc)
    return rec


def p_text(row: dict, *, sep: str = " ") -> str:
    """A deletion test's p as printed: `p=0.031`, or `p<=1/21` at its floor (no random set as harmful), with
    q and z beside it where known."""
    p, R = row.get("p_empirical"), row.get("n_random")
    if not isinstance(p, (int, float)) or not np.isfinite(p):
        return ""
    text = f"p<=1/{int(R) + 1}" if row.get("p_at_floor") and R else f"p={p:.2g}"
    q = row.get("q_value")
    if isinstance(q, (int, float)) and np.isfinite(q):
        text += f" q={q:.2g}" + (" *" if q < 0.05 else "")
    z = row.get("z_score")
    if isinstance(z, (int, float)) and np.isfinite(z):
        text += f" z={z:+.1f}"
    return sep + text


def deletion_q_values(rows: list[dict]) -> int:
    """Benjamini-Hochberg q (`q_value`) over the top-set tests of `rows` (one family), in place; returns the
    number of tests."""
    from pipeline.analysis.pair import benjamini_hochberg

    tests = [r for r in rows if isinstance(r.get("p_empirical"), (int, float)) and np.isfinite(r["p_empirical"])]
    if tests:
        for r, q in zip(tests, benjamini_hochberg(np.asarray([r["p_empirical"] for r in tests]))):
            r["q_value"] = float(q)
    return len(tests)


def adjust_deletion_family(store, run_id: int) -> dict | None:
    """q-values over every deletion test of an analysis run (each model, score and k: one family), written
    back into the `deletion_<model>` documents with the family's description (`multiplicity`)."""
    from store import results as R
    from store.jsonsafe import plain

    names = [n for n in store.json_names(run_id) if n.startswith("deletion_")]
    docs = {n: store.get_json(run_id, n) for n in names}
    docs = {n: d for n, d in docs.items() if isinstance(d, dict) and d.get("sets")}
    if not docs:
        return None
    n_tests = deletion_q_values([row for d in docs.values() for row in d["sets"]])
    family = {
        "method": "Benjamini-Hochberg (scipy.stats.false_discovery_control)",
        "family": "every deletion test of this analysis run (each model, score and k)",
        "n_tests": n_tests,
    }
    for n, doc in docs.items():
        doc[R.FIELD_MULTIPLICITY] = family
        store.put_json(run_id, n, plain(doc))
    return family


def adjust_run_deletion_family(store, run_id: int) -> dict | None:
    """q-values over every deletion test of a pipeline run, one family: each analysed model's tests once (from its
    `model` run, whatever the number of pairs showing them), each score and k. Written into the model runs'
    documents and into every copy on a pair's analysis run of the same task, so a test reads the same q wherever
    it is shown. Idempotent: computed from the stored p-values alone, so a resumed run stores the same q."""
    from store import results as R
    from store.jsonsafe import plain

    children = [store.get_run(c["id"]) for c in store.children(run_id)]
    units = [c for c in children if c["kind"] == R.KIND_MODEL]
    pairs = [c for c in children if c["kind"] == R.KIND_ANALYSIS]
    docs = {}
    for unit in units:
        for name in store.json_names(unit["id"]):
            doc = store.get_json(unit["id"], name) if name.startswith("deletion_") else None
            if isinstance(doc, dict) and doc.get("sets"):
                docs[(unit["id"], name)] = (R.run_config(unit).get("task"), doc)
    if not docs:
        return None
    n_tests = deletion_q_values([row for _, doc in docs.values() for row in doc["sets"]])
    family = {
        "method": "Benjamini-Hochberg (scipy.stats.false_discovery_control)",
        "family": "every deletion test of this pipeline run (each analysed model once, each score and k)",
        "n_tests": n_tests,
    }
    for (unit_id, name), (task, doc) in docs.items():
        doc[R.FIELD_MULTIPLICITY] = family
        store.put_json(unit_id, name, plain(doc))
        for pair in pairs:
            if R.run_config(pair).get("task") == task and name in store.json_names(pair["id"]):
                store.put_json(pair["id"], name, plain(doc))
    return family


def adjust_multiplicity(store, run_id: int) -> dict:
    """Benjamini-Hochberg q-values of an analysis run, each family at once: every overlap test
    (`pipeline.analysis.pair.adjust_overlap_family`) and every deletion test (`adjust_deletion_family`).
    Idempotent: run it again after adding tests."""
    from pipeline.analysis.pair import adjust_overlap_family

    return {"overlap": adjust_overlap_family(store, run_id), "deletion": adjust_deletion_family(store, run_id)}
