"""The thesis's figures from a run in the store, as PNG and SVG (matplotlib, headless).

fig. 1 UMAP of the cells by dose and group; fig. 3 confusion matrices; fig. 4 layer x head attention
similarity; fig. 5/6 attention received per rank and its difference, median length marked; fig. 7 top
attended versus top DE genes; table 8 the key-gene table; fig. 9 the norm-based heatmaps; fig. 10
attribution; fig. 11 in-silico deletion beside matched random sets; fig. 12 the randomisation cascade.
Everything is read from the store, so a figure can be redrawn for any finished run without recomputation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from store import results as R


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, stem: str, written: list[Path]) -> None:
    """PNG and SVG, each written atomically (`io.atomic_file`): a full disk leaves no half-written figure
    and ends as one `DiskFullError` line."""
    from pipeline.io import atomic_file

    try:
        for ext in ("png", "svg"):
            path = out / f"{stem}.{ext}"
            with atomic_file(path) as tmp:
                fig.savefig(tmp, format=ext, dpi=150 if ext == "png" else None, bbox_inches="tight")
            written.append(path)
    finally:
        _plt().close(fig)


def _slug(text: str) -> str:
    from pipeline.paths import file_name

    return file_name("".join(ch if ch.isalnum() else "_" for ch in text).strip("_").lower())


def plot_run(store, run_id: int, out_dir: str | Path) -> list[Path]:
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    scope = R.collect_scope(store, run_id, depth=1)

    for c in scope.data_runs:
        record = R.read_data_record(store, c)
        cells = record.cells
        columns = record.task_columns()[:3]
        if record.has_umap() and columns:
            fig, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 4.5), squeeze=False)
            for ax, column in zip(axes[0], columns):
                classes = record.class_order(column)
                cmap = plt.get_cmap("viridis", len(classes)) if len(classes) > 2 else None
                for i, name in enumerate(classes):
                    m = cells[column].astype(str) == name
                    colour = cmap(i) if cmap is not None else ("tab:blue", "tab:red")[i]
                    ax.scatter(cells.loc[m, R.CELL_UMAP1], cells.loc[m, R.CELL_UMAP2], s=4, color=colour, label=name)
                ax.set_title(f"cells by {column}")
                ax.legend(markerscale=3, fontsize=7)
                ax.set_xlabel("UMAP1")
                ax.set_ylabel("UMAP2")
            _save(fig, out, "fig1_umap", written)

    finetunes = [R.read_finetune(store, c) for c in scope.of_kind(R.KIND_FINETUNE)]
    tasks = sorted({ft.task for ft in finetunes})
    for task in tasks:
        mats = [ft for ft in finetunes if ft.task == task and ft.confusion is not None]
        if not mats:
            continue
        fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 4), squeeze=False)
        for ax, ft in zip(axes[0], mats):
            matrix = np.asarray(ft.confusion.matrix, dtype=float)
            frac = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
            ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
            for i in range(matrix.shape[0]):
                for j in range(matrix.shape[1]):
                    ax.text(
                        j,
                        i,
                        f"{int(matrix[i, j])}",
                        ha="center",
                        va="center",
                        color="white" if frac[i, j] > 0.5 else "black",
                        fontsize=8,
                    )
            labels = ft.confusion.labels
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            acc, f1 = (float("nan") if v is None else v for v in (ft.accuracy, ft.macro_f1))
            ax.set_title(f"{ft.mode}\nacc {acc:.2f}  F1 {f1:.2f}", fontsize=9)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
        _save(fig, out, f"fig3_confusion_{_slug(task)}", written)

    de = R.completed_de(store, scope.de_runs)
    for c in scope.analyses:
        an = R.read_pair_analysis(store, c, genes=True)
        stem = _slug(an.name)
        names = an.model_names
        if R.GRID_COSINE in an.grids:
            g = an.grids[R.GRID_COSINE]
            fig, ax = plt.subplots(figsize=(1.2 + 0.6 * g.values.shape[1], 1 + 0.5 * g.values.shape[0]))
            im = ax.imshow(g.values, cmap="magma", vmin=min(0.0, float(np.nanmin(g.values))), vmax=1)
            for (i, j), v in np.ndenumerate(g.values):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"attention cosine similarity\n{an.name}", fontsize=9)
            fig.colorbar(im, ax=ax)
            _save(fig, out, f"fig4_similarity_{stem}", written)
        norm_grids = an.norm_grids()
        if norm_grids:
            fig, axes = plt.subplots(
                1, len(norm_grids), figsize=(3.4 * len(norm_grids), 3.2), squeeze=False, constrained_layout=True
            )
            for ax, grid in zip(axes[0], norm_grids):
                n = grid.name
                v = np.asarray(grid.values, dtype=float)
                im = ax.imshow(v, cmap="viridis", aspect="auto")
                for (i, j), x in np.ndenumerate(v):
                    ax.text(
                        j,
                        i,
                        f"{x:.3g}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if x < np.nanmean(v) else "black",
                    )
                model = names.get(n[-1], n[-1])
                summed = n.startswith(R.grid_norm_summed(""))
                ax.set_title(f"norm-based, {model}" + (" (heads summed)" if summed else ""), fontsize=8)
                ax.set_xticks(range(v.shape[1]), ["all"] if summed and v.shape[1] == 1 else range(v.shape[1]))
                ax.set_yticks(range(v.shape[0]))
                ax.set_xlabel("head")
                ax.set_ylabel("layer")
                fig.colorbar(im, ax=ax, shrink=0.8)
            _save(fig, out, f"fig9_norms_{stem}", written)
        ranks = an.ranks
        if ranks.pct_diff is not None:
            fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
            for s, values in ranks.received.items():
                axes[0].plot(values, label=names.get(s, s), lw=1)
            axes[0].set_ylabel("attention received")
            axes[0].legend()
            axes[1].plot(ranks.pct_diff, lw=1, color="tab:purple")
            axes[1].axhline(0, color="grey", lw=0.5)
            axes[1].set_ylabel(f"% difference ({names['b']} vs {names['a']})")
            axes[1].set_xlabel("rank position")
            median = ranks.length_hist.median if ranks.length_hist is not None else None
            if median is not None:
                for ax in axes:
                    ax.axvline(median, color="tab:red", ls="--", lw=1, label="median length")
            axes[0].set_title(f"attention received per rank: {an.name}", fontsize=9)
            _save(fig, out, f"fig5_ranks_{stem}", written)
        if an.genes is not None:
            if de is not None and de.table is not None:
                compared = f"{de.group} vs {de.reference}" if de.group and de.reference else "DE"
                _attention_vs_de(plt, an.genes, de.table, an.de_overlap, names, out, stem, written, compared=compared)
            _gene_figures(plt, an.genes, out, stem, written)
        _attribution_figure(plt, store, an, out, stem, written)
        _deletion_figure(plt, store, an, out, stem, written)
        _sanity_figure(plt, store, an, out, stem, written)
    return written


def _deletion_figure(plt, store, an, out: Path, stem: str, written: list[Path]) -> None:
    """Fig. 11: in-silico deletion. Per model of the pair, the change of the true-class probability when
    each score's top k genes are deleted (lines) beside the 2.5-97.5% band of its matched random sets;
    and, for the second model, each gene's key score against its single-gene deletion effect."""
    docs = [(m, R.read_json(store, an.run_id, (R.json_deletion(m),)).get(R.json_deletion(m))) for m in an.models]
    docs = [(m, d) for m, d in docs if d and d.get("sets")]
    if not docs:
        return
    fig, axes = plt.subplots(1, len(docs) + 1, figsize=(5.5 * (len(docs) + 1), 4.5), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (model, doc) in zip(axes[0], docs):
        for i, score in enumerate(doc.get("scores", [])):
            rows = sorted((r for r in doc["sets"] if r["score"] == score), key=lambda r: r["k"])
            if not rows:
                continue
            k = [r["k"] for r in rows]
            ax.plot(k, [r["delta_prob_mean"] for r in rows], "o-", color=colours(i), lw=1, ms=3, label=score)
            low = [r.get("random_delta_prob_low") for r in rows]
            high = [r.get("random_delta_prob_high") for r in rows]
            if all(v is not None for v in low + high):
                ax.fill_between(k, low, high, color=colours(i), alpha=0.12, lw=0)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("top k genes deleted")
        ax.set_ylabel("change of the true-class probability")
        ax.set_title(f"deletion, {model} (bands: matched random sets)", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    b = R.MODEL_SUFFIXES[len(an.models) - 1]
    genes = an.genes
    if genes is not None and R.col_deletion_logit(b) in genes.columns:
        sub = genes.dropna(subset=[R.col_deletion_logit(b), R.col_key_score(b)])
        ax.scatter(sub[R.col_key_score(b)], sub[R.col_deletion_logit(b)], s=8, alpha=0.7)
        for r in sub.nsmallest(8, R.col_deletion_logit(b)).itertuples():
            ax.annotate(
                r.symbol or r.ensembl_id,
                (getattr(r, R.col_key_score(b)), getattr(r, R.col_deletion_logit(b))),
                fontsize=6,
            )
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(f"key score ({an.model_names.get(b, b)})")
        ax.set_ylabel("single-gene deletion: change of the true-class logit")
        ax.set_title("attended (controlled) vs used", fontsize=9)
    fig.tight_layout()
    _save(fig, out, f"fig11_deletion_{stem}", written)


def _sanity_figure(plt, store, an, out: Path, stem: str, written: list[Path]) -> None:
    """Fig. 12: cascading randomisation. Per model, each score's Spearman with the trained model's as the
    head, the layers from the top and the embeddings are re-initialised in turn."""
    docs = [(m, R.read_json(store, an.run_id, (R.json_sanity(m),)).get(R.json_sanity(m))) for m in an.models]
    docs = [(m, d) for m, d in docs if d and d.get("steps")]
    if not docs:
        return
    fig, axes = plt.subplots(1, len(docs), figsize=(6 * len(docs), 4.5), squeeze=False)
    for ax, (model, doc) in zip(axes[0], docs):
        steps = ["trained", *doc["steps"]]
        for score, values in doc["scores"].items():
            y = [1.0] + [np.nan if v is None else v for v in values["spearman"]]
            ax.plot(range(len(steps)), y, "o-", lw=1, ms=3, label=score)
        ax.axhline(0.8, color="tab:red", ls="--", lw=0.8)
        ax.set_xticks(range(len(steps)), steps, rotation=30, fontsize=7)
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("Spearman with the trained model's score")
        ax.set_title(f"randomisation cascade, {model}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out, f"fig12_randomisation_{stem}", written)


def _attention_vs_de(
    plt,
    genes,
    de,
    overlap: dict | None,
    names: dict,
    out: Path,
    stem: str,
    written: list[Path],
    top: int = 20,
    compared: str = "DE",
) -> None:
    """Fig. 7: the top DE genes (Wilcoxon score, the DE run's group vs reference) beside the key genes (the
    most attended genes in runs without a key score) of the second model, each DE gene labelled with its attention rank and each attended gene marked when it is among
    the top DE genes; a third panel gives the overlap of the two top-k lists against chance (k^2 / N)."""
    a, b = R.MODEL_SUFFIXES
    # the key genes (the controlled key score) where the run has them, else summed attention (older runs)
    keyed = R.col_key_score(b) in genes.columns
    column = R.col_key_score(b) if keyed else R.col_attn(b) if R.col_attn(b) in genes.columns else None
    if column is None or R.COL_SCORE not in de.columns:
        return
    present = set(genes[R.COL_ENSEMBL_ID].astype(str))
    de = de[de[R.COL_ENSEMBL_ID].astype(str).isin(present)].dropna(subset=[R.COL_SCORE])
    de = de.sort_values(R.COL_SCORE, ascending=False, kind="stable")
    ranked = genes.dropna(subset=[column]).sort_values(column, ascending=False, kind="stable")
    attn_rank = {g: i + 1 for i, g in enumerate(ranked[R.COL_ENSEMBL_ID].astype(str))}
    de_rank = {g: i + 1 for i, g in enumerate(de[R.COL_ENSEMBL_ID].astype(str))}
    top_de, top_attn = de.head(top), ranked.head(top)
    panels = 3 if overlap and overlap.get("overlap") else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 0.28 * top + 1.6))
    what = "key gene" if keyed else "attention"
    labels = [
        f"{R.gene_label(r)}  ({what} #{attn_rank.get(str(r[R.COL_ENSEMBL_ID]), '-')})" for _, r in top_de.iterrows()
    ]
    axes[0].barh(labels[::-1], top_de[R.COL_SCORE].to_numpy()[::-1], color="tab:orange")
    axes[0].set_title(f"top DE genes, {compared} (Wilcoxon score)", fontsize=9)
    # each key gene labelled with its DE rank in the direction it goes: "up in high #3", "up in low #12"
    group, reference = (compared.split(" vs ", 1) + [""])[:2] if " vs " in compared else ("the group", "the reference")
    reference = "the other classes" if reference == "rest" else reference
    down_rank = {g: i + 1 for i, g in enumerate(de[R.COL_ENSEMBL_ID].astype(str).tolist()[::-1])}
    de_score = dict(zip(de[R.COL_ENSEMBL_ID].astype(str), de[R.COL_SCORE].astype(float)))

    def de_text(gene: str) -> str:
        if gene not in de_score:
            return "not in DE"
        if de_score[gene] >= 0:
            return f"up in {group} #{de_rank[gene]}"
        return f"up in {reference} #{down_rank[gene]}"

    either = {g for g in de_rank if de_rank[g] <= top or down_rank[g] <= top}
    colours = ["tab:red" if str(g) in either else "tab:blue" for g in top_attn[R.COL_ENSEMBL_ID]]
    labels = [f"{R.gene_label(r)}  ({de_text(str(r[R.COL_ENSEMBL_ID]))})" for _, r in top_attn.iterrows()]
    axes[1].barh(labels[::-1], top_attn[column].to_numpy()[::-1], color=colours[::-1])
    title = "key genes" if keyed else "most attended genes"
    axes[1].set_title(f"{title}, {names['b']} (red: among the top {top} DE, either direction)", fontsize=9)
    axes[0].set_xlabel("Wilcoxon score")
    axes[1].set_xlabel(
        "key score (log2 attention over its positions' and frequency's, shrunk)"
        if keyed
        else "attention received (summed over cells, layers and heads)"
    )
    for ax in axes[:2]:
        ax.tick_params(axis="y", labelsize=7)
    if panels == 3:
        ax = axes[2]
        for col, style in (
            (R.col_key_score(a), "^--"),
            (R.col_key_score(b), "^-"),
            (R.col_attn(a), "o--"),
            (R.col_attn(b), "o-"),
            (R.col_attn_norm(a), "s--"),
            (R.col_attn_norm(b), "s-"),
        ):
            block = (overlap.get("by_column") or {}).get(col)
            if not block:
                continue
            ks = [item["k"] for item in block["overlap"]]
            kind = "key score" if col.startswith("key_score") else "norm-based" if "norm" in col else "weight-based"
            ax.plot(ks, [item["overlap"] for item in block["overlap"]], style, ms=4, label=f"{names[col[-1]]}, {kind}")
        items = overlap["overlap"]
        ax.plot([i["k"] for i in items], [i["expected"] for i in items], ":", color="grey", label="chance (k²/N)")
        ax.set_xscale("log")
        ax.set_xlabel("k")
        ax.set_ylabel("genes in both top-k lists")
        n = overlap.get("population", overlap.get("background"))
        ax.set_title(f"top-k overlap with genes up in {group} (N = {n} genes the key score ranks)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out, f"fig7_attention_vs_de_{stem}", written)


def _gene_figures(plt, df, out: Path, stem: str, written: list[Path], top: int = 20) -> None:
    a, b = R.MODEL_SUFFIXES
    wanted = (
        R.COL_SYMBOL,
        R.COL_ENSEMBL_ID,
        R.col_key_score(a),
        R.col_key_score(b),
        R.col_deletion_logit(b),
        R.col_attn_scaled(a),
        R.col_attn_scaled(b),
        R.COL_N_CELLS,
        R.COL_RANK_STD,
        # the mean rank per class of the analysed task, in the user's class names
        *[c for c in df.columns if c.startswith(R.COL_RANK_MEAN + "_") and c != R.COL_RANK_STD],
        R.COL_DE_SCORE,
        R.COL_IN_REFERENCE_SET,
    )
    cols = [c for c in dict.fromkeys(wanted) if c in df.columns]
    order = [c for c in (R.col_key_score(b), R.col_attn_scaled(b)) if c in df.columns] or [cols[-1]]
    table = df.sort_values(order[0], ascending=False, na_position="last").head(top)[cols]
    fig, ax = plt.subplots(figsize=(min(16, 1.6 * len(cols)), 0.35 * (len(table) + 2)))
    ax.axis("off")
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    tab = ax.table(cellText=cells, colLabels=cols, loc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    _save(fig, out, f"table8_key_genes_{stem}", written)
    table.to_csv(out / f"table8_key_genes_{stem}.csv", index=False)
    written.append(out / f"table8_key_genes_{stem}.csv")


def _attribution_figure(plt, store, an, out: Path, stem: str, written: list[Path]) -> None:
    """Fig. 10: what the prediction uses against what is attended, for the second model of the pair:
    attribution per rank position for each method (scaled to its maximum), each gene's attention received
    against its Hao attribution, and each score's top-k overlap with DE."""
    a, b = R.MODEL_SUFFIXES
    model = an.model_names.get(b, b)
    attr = R.read_attribution(store, an.run_id, model, genes=True)
    if attr is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for method, curve in attr.rank.items():
        curve = np.asarray(curve, dtype=float)
        scale = np.nanmax(np.abs(curve)) or 1.0
        axes[0].plot(curve / scale, lw=1, label=method)
    axes[0].set_xlabel("rank position")
    axes[0].set_ylabel("attribution per rank (scaled)")
    axes[0].set_title(f"attribution per rank, {model}", fontsize=9)
    axes[0].legend(fontsize=7)
    genes = attr.genes
    column = R.col_attr("hao")
    if genes is not None and an.genes is not None and column in genes.columns and R.col_attn(b) in an.genes.columns:
        merged = genes[[R.COL_ENSEMBL_ID, column]].merge(
            an.genes[[R.COL_ENSEMBL_ID, R.col_attn(b)]], on=R.COL_ENSEMBL_ID
        )
        axes[1].scatter(merged[R.col_attn(b)], merged[column], s=4, alpha=0.6)
        axes[1].set_xscale("symlog")
        axes[1].set_xlabel(f"attention received ({model})")
        axes[1].set_ylabel("Hao attribution per occurrence")
        axes[1].set_title("attended vs used", fontsize=9)
    for method, cmp in (attr.info.get("de") or {}).items():
        points = [(o["k"], o["overlap"]) for o in cmp.get("overlap", [])]
        if points:
            axes[2].plot(*zip(*points), "o-", label=method)
    axes[2].set_xlabel("k")
    axes[2].set_ylabel("top-k genes among the top-k DE genes")
    axes[2].set_title("overlap with DE", fontsize=9)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out, f"fig10_attribution_{stem}", written)
