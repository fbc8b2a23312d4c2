"""Stage `de`: scanpy's Wilcoxon test for each comparison, on the training and validation cells (the analysed
test cells held out) and on every cell."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import analysed_tasks
from pipeline.errors import InputError

if TYPE_CHECKING:  # annotations only
    from pipeline.run.context import Context


def _de_for(ctx: Context, task: str):
    """The DE table an analysis of `task` compares attention with: the task's one comparison (binary
    tasks), else None (several one-vs-rest tables; each is in its own DE run)."""
    tables = [de for (t, _, _), de in ctx.out.de.items() if t == task]
    return tables[0] if len(tables) == 1 else None


# --------------------------------------------------------------------------------------- DE
def de_comparisons(cfg: dict, sel) -> list[tuple[str, str, str]]:
    """(task, group, reference) of every DE comparison, as scanpy's `rank_genes_groups` would be asked.

    `de.groupby` (a task; default: each analysed task), `de.groups` and `de.reference` (a class or
    `rest`); by default a binary task compares its second class with its first, a task with more
    classes each class with the rest.
    """

    if not cfg["analysis"]["de"] or cfg["data"]["tokenized"]:
        return []
    d = cfg["de"]
    out = []
    for task in [d["groupby"]] if d["groupby"] else analysed_tasks(cfg):
        names = sel.names[task]
        binary = len(names) == 2
        groups = [str(g) for g in d["groups"]] or ([names[1]] if binary else list(names))
        reference = str(d["reference"]) or (names[0] if binary else "rest")
        for g in [*groups, reference]:
            if g not in names and g != "rest":
                raise InputError(f"de: {g!r} is not a class of task {task!r}; classes: {', '.join(names)}")
        out.extend((task, g, reference) for g in groups if g != reference)
    return out


def de_child_name(cfg: dict, task: str, group: str, reference: str) -> str:
    """`de: high vs low`; the task is named too when DE runs for several tasks."""

    several = not cfg["de"]["groupby"] and len(analysed_tasks(cfg)) > 1
    return f"de {task}: {group} vs {reference}" if several else f"de: {group} vs {reference}"


def stage_de(ctx: Context, task: str, group: str, reference: str) -> None:
    """scanpy's Wilcoxon of one class against another (or the rest) on the selected cells (thesis fig. 7)."""
    name = de_child_name(ctx.cfg, task, group, reference)
    from store import results as R

    done = ctx.completed_child(name, R.KIND_DE)
    if done is not None:
        ctx.rep.line(f"{name}: already computed (resumed)")
        de = ctx.store.gene_table_df(done, R.TABLE_DE)
        ctx.out.de[(task, group, reference)] = (
            _held_out_de(de, group, reference) if R.TABLE_DE_ALL_CELLS in ctx.store.gene_tables(done) else de
        )
        return
    from pipeline.analysis.pair import de_wilcoxon
    from pipeline.data.counts import ensembl_indexed

    adata = ensembl_indexed(
        ctx.selected_adata(), ctx.out.dicts, ctx.cfg["data"]["gene_id_column"] or None, source=ctx.out.data_path
    )
    adata.obs["_class"] = ctx.out.selection.class_names(task)
    child = ctx.new_child(name, R.KIND_DE, {"task": task, "groupby": task, "group": group, "reference": reference})
    with ctx.store.track(child):
        # the DE the analysis compares with sees no test cell (the analysed cells); every cell's DE: its own table
        held_out = np.asarray(ctx.out.split) != "test"
        tables = {}
        for table, keep in ((R.TABLE_DE, held_out), (R.TABLE_DE_ALL_CELLS, np.ones(len(held_out), dtype=bool))):
            de = de_wilcoxon(adata[keep], "_class", group, reference)
            if "symbol" not in de.columns:
                de.insert(1, "symbol", [""] * len(de))
            de["symbol"] = _fill_symbols(
                de, ctx.out.dicts, ctx.selected_adata(), ctx.cfg["data"]["gene_id_column"] or None
            )
            ctx.store.put_gene_table(child, table, de)
            tables[table] = de
        de = _held_out_de(tables["de"], group, reference)
    ctx.out.de[(task, group, reference)] = de
    top = de.head(10)
    labels = [
        str(sym) if isinstance(sym, str) and sym else str(ens) for sym, ens in zip(top["symbol"], top["ensembl_id"])
    ]
    ctx.rep.line(f"top DE genes ({group} vs {reference}): " + ", ".join(labels))


def _held_out_de(de, group: str, reference: str):
    """The DE table the analysis uses, saying which classes it compares and that test cells were held out."""
    from pipeline.analysis.pair import DE_ATTR_CELLS, DE_ATTR_CLASSES

    de.attrs[DE_ATTR_CLASSES] = (str(group), str(reference))
    de.attrs[DE_ATTR_CELLS] = "training and validation cells (the analysed test cells held out)"
    return de


def _fill_symbols(de, dicts, adata, gene_id_column) -> list[str]:
    """Gene symbols for a DE table: the dictionaries' where they name the gene, else the data's own var."""
    from pipeline.data.counts import gene_symbols_of

    from_data = gene_symbols_of(adata, dicts, gene_id_column)
    out = []
    for gid, sym in zip(de["ensembl_id"], de["symbol"]):
        sym = sym if isinstance(sym, str) and sym else dicts.id_to_symbol.get(gid, "") or from_data.get(gid, "")
        out.append(sym)
    return out
