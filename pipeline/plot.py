"""The thesis's figures from a run in the store, as PNG and SVG (matplotlib, headless).

fig. 1 UMAP of the cells by dose and group; fig. 3 confusion matrices; fig. 4 layer x head attention
similarity; fig. 5/6 attention received per rank and its difference, median length marked; fig. 7 top
attended versus top DE genes; table 8 the key-gene table; fig. 9 the norm-based heatmaps.
Everything is read from the store, so a figure can be redrawn for any finished run without recomputation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, stem: str, written: list[Path]) -> None:
    for ext in ("png", "svg"):
        path = out / f"{stem}.{ext}"
        fig.savefig(path, dpi=150 if ext == "png" else None, bbox_inches="tight")
        written.append(path)
    _plt().close(fig)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_").lower()


def plot_run(store, run_id: int, out_dir: str | Path) -> list[Path]:
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    children = store.children(run_id)
    by_kind: dict[str, list[dict]] = {}
    for c in children:
        by_kind.setdefault(c["kind"], []).append(c)

    for c in by_kind.get("data", []):
        cells = store.cells(c["id"])
        if {"umap1", "umap2"} <= set(cells.columns):
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
            doses = sorted(cells["dose"].unique())
            cmap = plt.get_cmap("viridis", len(doses))
            for i, d in enumerate(doses):
                m = cells["dose"] == d
                axes[0].scatter(cells.loc[m, "umap1"], cells.loc[m, "umap2"], s=4, color=cmap(i), label=f"{d:g} uM")
            axes[0].set_title("cells by dose")
            axes[0].legend(markerscale=3, fontsize=7)
            for g, colour in (("low", "tab:blue"), ("high", "tab:red")):
                m = cells["group"] == g
                axes[1].scatter(cells.loc[m, "umap1"], cells.loc[m, "umap2"], s=4, color=colour, label=g)
            axes[1].set_title("cells by group")
            axes[1].legend(markerscale=3, fontsize=7)
            for ax in axes:
                ax.set_xlabel("UMAP1")
                ax.set_ylabel("UMAP2")
            _save(fig, out, "fig1_umap", written)

    finetunes = by_kind.get("finetune", [])
    tasks = sorted({c["name"].split("/")[0] for c in finetunes})
    for task in tasks:
        runs = [c for c in finetunes if c["name"].split("/")[0] == task]
        mats = [(c, store.confusions(c["id"])) for c in runs]
        mats = [(c, m[0]) for c, m in mats if m]
        if not mats:
            continue
        fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 4), squeeze=False)
        for ax, (c, conf) in zip(axes[0], mats):
            matrix = np.asarray(conf["matrix"], dtype=float)
            frac = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
            ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
            for i in range(matrix.shape[0]):
                for j in range(matrix.shape[1]):
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                            color="white" if frac[i, j] > 0.5 else "black", fontsize=8)
            labels = conf["labels"]
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            metrics = {m["name"]: m["value"] for m in store.metrics(c["id"], split="test")}
            ax.set_title(f"{c['name'].split('/')[1]}\nacc {metrics.get('accuracy', float('nan')):.2f}"
                         f"  F1 {metrics.get('macro_f1', float('nan')):.2f}", fontsize=9)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
        _save(fig, out, f"fig3_confusion_{_slug(task)}", written)

    for c in by_kind.get("analysis", []):
        stem = _slug(c["name"])
        cfg = store.get_run(c["id"]).get("config") or {}
        names = {"a": cfg.get("model_a", "model a"), "b": cfg.get("model_b", "model b")}
        grids = store.grid_names(c["id"])
        if "cosine" in grids:
            g = store.grid(c["id"], "cosine")
            fig, ax = plt.subplots(figsize=(1.2 + 0.6 * g["values"].shape[1], 1 + 0.5 * g["values"].shape[0]))
            im = ax.imshow(g["values"], cmap="magma", vmin=min(0.0, float(np.nanmin(g["values"]))), vmax=1)
            for (i, j), v in np.ndenumerate(g["values"]):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"attention cosine similarity\n{c['name']}", fontsize=9)
            fig.colorbar(im, ax=ax)
            _save(fig, out, f"fig4_similarity_{stem}", written)
        norm_grids = [n for n in grids if n.startswith("norm")]
        if norm_grids:
            fig, axes = plt.subplots(1, len(norm_grids), figsize=(3.4 * len(norm_grids), 3.2), squeeze=False,
                                     constrained_layout=True)
            for ax, n in zip(axes[0], norm_grids):
                v = np.asarray(store.grid(c["id"], n)["values"], dtype=float)
                im = ax.imshow(v, cmap="viridis", aspect="auto")
                for (i, j), x in np.ndenumerate(v):
                    ax.text(j, i, f"{x:.3g}", ha="center", va="center", fontsize=7,
                            color="white" if x < np.nanmean(v) else "black")
                model = names.get(n[-1], n[-1])
                summed = "summed" in n
                ax.set_title(f"norm-based, {model}" + (" (heads summed)" if summed else ""), fontsize=8)
                ax.set_xticks(range(v.shape[1]), ["all"] if summed and v.shape[1] == 1 else range(v.shape[1]))
                ax.set_yticks(range(v.shape[0]))
                ax.set_xlabel("head")
                ax.set_ylabel("layer")
                fig.colorbar(im, ax=ax, shrink=0.8)
            _save(fig, out, f"fig9_norms_{stem}", written)
        vectors = store.vector_names(c["id"])
        if "rank_pct_diff" in vectors:
            fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
            for n in ("rank_received_a", "rank_received_b"):
                if n in vectors:
                    axes[0].plot(store.vector(c["id"], n), label=names.get(n[-1], n[-1]), lw=1)
            axes[0].set_ylabel("attention received")
            axes[0].legend()
            axes[1].plot(store.vector(c["id"], "rank_pct_diff"), lw=1, color="tab:purple")
            axes[1].axhline(0, color="grey", lw=0.5)
            axes[1].set_ylabel(f"% difference ({names['b']} vs {names['a']})")
            axes[1].set_xlabel("rank position")
            meta = store.vector_meta(c["id"], "length_hist") if "length_hist" in vectors else {}
            median = (meta or {}).get("median")
            if median is not None:
                for ax in axes:
                    ax.axvline(median, color="tab:red", ls="--", lw=1, label="median length")
            axes[0].set_title(f"attention received per rank: {c['name']}", fontsize=9)
            _save(fig, out, f"fig5_ranks_{stem}", written)
        if "genes" in store.gene_tables(c["id"]):
            df = store.gene_table_df(c["id"], "genes")
            de = _de_table(store, by_kind.get("de", []))
            overlap = store.get_json(c["id"], "de_overlap") if "de_overlap" in store.json_names(c["id"]) else None
            if de is not None:
                _attention_vs_de(plt, df, de, overlap, names, out, stem, written)
            _gene_figures(plt, df, cfg, out, stem, written)
    return written


def _gene_label(row) -> str:
    """A gene's symbol, or its Ensembl ID where it has none."""
    return row["symbol"] if isinstance(row.get("symbol"), str) and row["symbol"] else row["ensembl_id"]


def _de_table(store, de_runs: list[dict]):
    """The Wilcoxon table of the run's completed DE child (columns ensembl_id, symbol, score, ...)."""
    for c in de_runs:
        if c["status"] == "completed" and "de" in store.gene_tables(c["id"]):
            return store.gene_table_df(c["id"], "de")
    return None


def _attention_vs_de(plt, genes, de, overlap: dict | None, names: dict, out: Path, stem: str, written: list[Path],
                     top: int = 20) -> None:
    """Fig. 7: the top DE genes (Wilcoxon score, high vs low) beside the most attended genes of the second
    model, each DE gene labelled with its attention rank and each attended gene marked when it is among
    the top DE genes; a third panel gives the overlap of the two top-k lists against chance (k^2 / N)."""
    column = "attn_b" if "attn_b" in genes.columns else None
    if column is None or "score" not in de.columns:
        return
    present = set(genes["ensembl_id"].astype(str))
    de = de[de["ensembl_id"].astype(str).isin(present)].dropna(subset=["score"])
    de = de.sort_values("score", ascending=False, kind="stable")
    ranked = genes.dropna(subset=[column]).sort_values(column, ascending=False, kind="stable")
    attn_rank = {g: i + 1 for i, g in enumerate(ranked["ensembl_id"].astype(str))}
    de_rank = {g: i + 1 for i, g in enumerate(de["ensembl_id"].astype(str))}
    top_de, top_attn = de.head(top), ranked.head(top)
    panels = 3 if overlap and overlap.get("overlap") else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 0.28 * top + 1.6))
    labels = [f"{_gene_label(r)}  (attention #{attn_rank.get(str(r['ensembl_id']), '-')})" for _, r in top_de.iterrows()]
    axes[0].barh(labels[::-1], top_de["score"].to_numpy()[::-1], color="tab:orange")
    axes[0].set_title("top DE genes, high vs low (Wilcoxon score)", fontsize=9)
    colours = ["tab:red" if de_rank.get(str(g), top + 1) <= top else "tab:blue" for g in top_attn["ensembl_id"]]
    labels = [f"{_gene_label(r)}  (DE #{de_rank.get(str(r['ensembl_id']), '-')})" for _, r in top_attn.iterrows()]
    axes[1].barh(labels[::-1], top_attn[column].to_numpy()[::-1], color=colours[::-1])
    axes[1].set_title(f"most attended genes, {names['b']} (red: among the top {top} DE)", fontsize=9)
    axes[0].set_xlabel("Wilcoxon score")
    axes[1].set_xlabel("attention received (summed over cells, layers and heads)")
    for ax in axes[:2]:
        ax.tick_params(axis="y", labelsize=7)
    if panels == 3:
        ax = axes[2]
        for col, style in (("attn_a", "o--"), ("attn_b", "o-"), ("attn_norm_a", "s--"), ("attn_norm_b", "s-")):
            block = (overlap.get("by_column") or {}).get(col)
            if not block:
                continue
            ks = [item["k"] for item in block["overlap"]]
            kind = "norm-based" if "norm" in col else "weight-based"
            ax.plot(ks, [item["overlap"] for item in block["overlap"]], style, ms=4, label=f"{names[col[-1]]}, {kind}")
        items = overlap["overlap"]
        ax.plot([i["k"] for i in items], [i["expected"] for i in items], ":", color="grey", label="chance (k²/N)")
        ax.set_xscale("log")
        ax.set_xlabel("k")
        ax.set_ylabel("genes in both top-k lists")
        ax.set_title(f"top-k overlap, attention vs DE (N = {overlap.get('background')})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out, f"fig7_attention_vs_de_{stem}", written)


def _gene_figures(plt, df, cfg: dict, out: Path, stem: str, written: list[Path], top: int = 20) -> None:
    cols = [c for c in ("symbol", "ensembl_id", "attn_scaled_a", "attn_scaled_b", "n_cells", "rank_std",
                        "rank_mean_low", "rank_mean_high", "de_score", "in_reference_set") if c in df.columns]
    sort_col = "attn_scaled_b" if "attn_scaled_b" in df.columns else cols[-1]
    table = df.sort_values(sort_col, ascending=False).head(top)[cols]
    fig, ax = plt.subplots(figsize=(min(16, 1.6 * len(cols)), 0.35 * (len(table) + 2)))
    ax.axis("off")
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    tab = ax.table(cellText=cells, colLabels=cols, loc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    _save(fig, out, f"table8_key_genes_{stem}", written)
    table.to_csv(out / f"table8_key_genes_{stem}.csv", index=False)
    written.append(out / f"table8_key_genes_{stem}.csv")
