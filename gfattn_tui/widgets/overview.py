"""Overview tab: the results, in the researcher's words (docs/architecture.md, "The TUI").

First the run's warnings, then per task the modes' test accuracy and macro-F1 beside the baseline (a
model that did not learn is marked), the checkpoint check, and per analysis its headline: cosine per
layer, key genes by model, DE overlap with its p-values (q-values where stored), one line of set
deletion, of the randomisation cascade and of attribution per model. Then, collapsed, the details: the
run (provenance), its stages, child runs, the log, the run's own records (as tables), the configuration
and package versions. Stored names are shown with model names (`key_score_b` -> "key score unfrozen").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Collapsible, DataTable, Label, ProgressBar, RichLog, Static

from gfattn_tui.format import (
    STATUS_MARKS,
    as_epoch,
    fmt_deletion_p,
    fmt_duration,
    fmt_num,
    fmt_p,
    fmt_p_resolved,
    fmt_q,
    fmt_time,
    in_model_words,
    model_label,
    run_duration,
)
from gfattn_tui.json_render import render_json
from gfattn_tui.messages import Loaded, OpenRun
from gfattn_tui.results import run_progress_text
from gfattn_tui.widgets.store_view import RunView
from store import results as R
from store.results import flatten_config

# documents shown as results above (not again among the records)
SHOWN_DOCS = (R.JSON_WARNINGS, R.JSON_CHECKPOINT_CHECK)


@dataclass
class OverviewResults:
    """What the Overview shows above its details."""

    summary: R.ResultsSummary
    warnings: list[dict] = field(default_factory=list)
    gates: dict[int, dict] = field(default_factory=dict)  # finetune run id -> gate
    baselines: dict[int, dict] = field(default_factory=dict)  # finetune run id -> baseline metrics
    checkpoint: dict | None = None
    deletion: dict[int, dict[str, dict]] = field(default_factory=dict)  # analysis id -> model -> document
    sanity: dict[int, dict[str, dict]] = field(default_factory=dict)
    attribution: dict[int, dict[str, dict]] = field(default_factory=dict)
    de_groups: dict[int, list[str]] = field(default_factory=dict)  # analysis id -> comparisons
    de_directions: dict[int, list[dict]] = field(default_factory=dict)  # analysis id -> per-direction overlaps
    records: dict[str, object] = field(default_factory=dict)  # the run's own other JSON documents

    @property
    def empty(self) -> bool:
        return self.summary.empty and not (self.warnings or self.checkpoint)


def read_overview(st, run_id: int) -> OverviewResults:
    scope = R.collect_scope(st, run_id)
    out = OverviewResults(summary=R.read_results_summary(st, run_id, scope))
    out.warnings = R.run_warnings(st, run_id)
    out.checkpoint = R.checkpoint_check(st, run_id)
    for row in out.summary.finetunes:
        gate = R.model_gate(st, row.run_id)
        if gate is not None:
            out.gates[row.run_id] = gate
        base = {k: v for k, v in R.baseline_scores(st, row.run_id).items() if v is not None}
        if base:
            out.baselines[row.run_id] = base
    for head in out.summary.analyses:
        names = set(st.json_names(head.run_id))
        for model in head.models:
            key = R.attr_model_key(model)
            for target, name in (
                (out.deletion, R.json_deletion(key)),
                (out.sanity, R.json_sanity(key)),
                (out.attribution, R.json_attribution(key)),
            ):
                if name in names:
                    doc = st.get_json(head.run_id, name)
                    if isinstance(doc, dict):
                        target.setdefault(head.run_id, {})[model] = doc
        if R.JSON_DE_OVERLAP in names:
            doc = st.get_json(head.run_id, R.JSON_DE_OVERLAP)
            if isinstance(doc, dict) and isinstance(doc.get("by_group"), dict):
                out.de_groups[head.run_id] = [str(g) for g in doc["by_group"]]
            if isinstance(doc, dict) and isinstance(doc.get("directions"), list):
                out.de_directions[head.run_id] = [d for d in doc["directions"] if isinstance(d, dict)]
    for name in st.json_names(run_id):
        if name not in SHOWN_DOCS:
            out.records[name] = st.get_json(run_id, name)
    return out


def _kv_table(rows: list[tuple[str, object]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else Text(str(value)))
    return table


class OverviewView(RunView, VerticalScroll):
    """The results first, then the details collapsed; the log and progress update live."""

    def __init__(self, run_id: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.stale = True
        self.last_event_id = 0
        self.run: dict | None = None
        self._expanded_once = False

    def compose(self) -> ComposeResult:
        yield Label("Results", classes="section", id="ov-results-title")
        yield Static("", id="ov-results")
        yield Static("", id="ov-error", classes="error-box")
        yield Label("", id="ov-progress-label")
        yield ProgressBar(id="ov-progress", show_eta=False)
        with Collapsible(title="Run", id="ov-run-box"):
            yield Static("", id="ov-summary")
        with Collapsible(title="Stages", id="ov-stages-box"):
            yield Static("", id="ov-stages")
        with Collapsible(title="Child runs  (enter opens)", id="ov-children-box"):
            yield DataTable(id="ov-children", cursor_type="row")
        with Collapsible(title="Log", id="ov-log-box"):
            yield RichLog(id="ov-log", max_lines=self.app.config.log_lines, wrap=True, markup=False)
        with Collapsible(title="Records", id="ov-records-box"):
            yield Static("", id="ov-records")
        with Collapsible(title="Configuration", id="ov-config-box"):
            yield Static("", id="ov-config")
        with Collapsible(title="Versions", id="ov-versions-box"):
            yield Static("", id="ov-versions")

    def on_mount(self) -> None:
        table = self.query_one("#ov-children", DataTable)
        for key, label in (("status", "status"), ("id", "id"), ("name", "name"), ("kind", "kind"), ("took", "took")):
            table.add_column(label, key=key)
        self.query_one("#ov-error").display = False
        self.query_one("#ov-progress").display = False
        self.query_one("#ov-progress-label").display = False
        self.query_one("#ov-results").display = False
        self.query_one("#ov-results-title").display = False
        self.query_one("#ov-records-box").display = False

    def reload(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="overview", name="overview")
    def load(self) -> None:
        run_id, since = self.run_id, self.last_event_id

        def read(st) -> dict:
            return {
                "run": st.get_run(run_id),
                "stages": st.stages(run_id),
                "children": st.children(run_id),
                "events": st.events(run_id, since_id=since),
                "results": read_overview(st, run_id),
            }

        self.post_message(Loaded("overview", self.client.call(read)))

    def on_loaded(self, message: Loaded) -> None:
        data = message.data
        run = self.run = data["run"]
        utc = self.app.config.utc
        now = self.app.now()
        results: OverviewResults = data["results"]
        self._show_results(results)
        self._show_summary(run, utc, now)
        self._show_error(run, data["children"])
        self._show_progress(run, data["stages"], now)
        self._show_stages(data["stages"], utc, now, run)
        self._show_children(data["children"], now)
        self._append_events(data["events"], utc)
        self._show_records(results)
        self._show_config(run)
        if not self._expanded_once:
            # a run without results (running, failed, a data run) opens on what it has: run, stages, log
            self._expanded_once = True
            if results.empty:
                for box in ("#ov-run-box", "#ov-stages-box", "#ov-log-box"):
                    self.query_one(box, Collapsible).collapsed = False

    # sections ------------------------------------------------------------------------------------
    def _show_summary(self, run: dict, utc: bool, now: float) -> None:
        status = str(run.get("status"))
        mark, style = STATUS_MARKS.get(status, ("·", ""))
        rows: list[tuple[str, object]] = [
            ("status", Text(f"{mark} {status}", style=style)),
            ("run", f"#{run['id']} {run.get('name', '')}  ({run.get('kind', '')})"),
        ]
        if run.get("parent_id") is not None:
            rows.append(("parent", f"#{run['parent_id']}"))
        rows += [
            ("started", fmt_time(run.get("created"), utc=utc, seconds=True)),
            ("finished", fmt_time(run.get("finished"), utc=utc, seconds=True)),
            ("duration", fmt_duration(run_duration(run, now))),
        ]
        if status == "running" and run.get("heartbeat") is not None:
            rows.append(("heartbeat", f"{fmt_duration(now - (as_epoch(run['heartbeat']) or now))} ago"))
        rows += [
            ("host", f"{run.get('host') or '—'}  pid {run.get('pid') or '—'}"),
            ("device", run.get("device") or "—"),
            ("git", run.get("git_commit") or "—"),
            ("data", _path_and_hash(run.get("data_path"), run.get("data_hash"))),
            ("model", _path_and_hash(run.get("model_path"), run.get("model_hash"))),
            ("tags", ", ".join(run.get("tags") or ()) or "—"),
            ("note", run.get("note") or "—"),
        ]
        self.query_one("#ov-summary", Static).update(_kv_table(rows))

    def _show_error(self, run: dict, children: list[dict]) -> None:
        box = self.query_one("#ov-error", Static)
        parts = []
        if run.get("error"):
            parts.append(Text(str(run["error"])))
        for child in children:
            if child.get("error"):
                parts.append(Text(f"child #{child['id']} {child.get('name')}: {child['error']}"))
        box.display = bool(parts)
        if parts:
            box.update(Group(Text("Error", style="bold red"), *parts))

    def _show_results(self, results: OverviewResults) -> None:
        box = self.query_one("#ov-results", Static)
        box.display = self.query_one("#ov-results-title").display = not results.empty
        if not results.empty:
            box.update(render_results(results))

    def _show_progress(self, run: dict, stages: list[dict], now: float) -> None:
        bar = self.query_one("#ov-progress", ProgressBar)
        label = self.query_one("#ov-progress-label", Label)
        overall = R.stage_progress(stages, run.get("progress"))
        # the progress row of a stage that has ended is stale: show it only while its stage runs
        progress = overall.progress if stages else run.get("progress")
        show = run.get("status") == "running" and (bool(progress) or bool(overall.total))
        bar.display = label.display = show
        if not show:
            return
        text, fraction = run_progress_text(run, stages, progress, now)
        if progress:
            done, total = progress.get("done") or 0, progress.get("total")
            unit = progress.get("unit") or ""
            line = f"{progress.get('stage')}: {fmt_num(done, 0)}" + (f" / {fmt_num(total, 0)}" if total else "")
            line += f" {unit}"
            if progress.get("throughput"):
                line += f"  ·  {fmt_num(progress['throughput'], 1)} {unit}/s"
            if progress.get("eta_s") is not None:
                line += f"  ·  ETA {fmt_duration(progress['eta_s'])}"
            text = f"{text}\n{line}" if text else line
        label.update(text or "between stages")
        bar.update(total=100, progress=round(100 * (fraction or 0.0)))

    def _show_stages(self, stages: list[dict], utc: bool, now: float, run: dict) -> None:
        table = Table.grid(padding=(0, 2))
        for _ in range(4):
            table.add_column()
        for s in stages:
            status = str(s.get("status"))
            if status == "failed" and run.get("status") == "interrupted":
                status = "interrupted"  # a stopped run's stage ended by the stop, not by an error
            mark, style = STATUS_MARKS.get(status, ("·", ""))
            start, end = as_epoch(s.get("started")), as_epoch(s.get("finished"))
            took = fmt_duration((end or now) - start) if start is not None and (end or status == "running") else ""
            began = fmt_time(start, utc=utc, seconds=True) if start else ""
            table.add_row(Text(f"{mark} {s.get('stage')}", style=style), status, took, began)
        self.query_one("#ov-stages", Static).update(table if stages else Text("no stages recorded", style="dim"))

    def _show_children(self, children: list[dict], now: float) -> None:
        table = self.query_one("#ov-children", DataTable)
        keep = table.cursor_row
        table.clear()
        for child in children:
            status = str(child.get("status"))
            mark, style = STATUS_MARKS.get(status, ("·", ""))
            table.add_row(
                Text(f"{mark} {status}", style=style),
                str(child["id"]),
                child.get("name") or "",
                child.get("kind") or "",
                fmt_duration(run_duration(child, now)),
                key=str(child["id"]),
            )
        self.query_one("#ov-children-box").display = bool(children)
        if children:
            table.move_cursor(row=min(keep, len(children) - 1))

    def _append_events(self, events: list[dict], utc: bool) -> None:
        log = self.query_one("#ov-log", RichLog)
        styles = {"error": "bold red", "warning": "yellow", "debug": "dim"}
        for event in events[-self.app.config.log_lines :]:
            line = Text(fmt_time(event.get("time"), utc=utc, seconds=True)[11:] + " ", style="dim")
            line.append(f"{event.get('stage') or '-':<10} ", style="cyan")
            line.append(str(event.get("message")), style=styles.get(str(event.get("level")), ""))
            log.write(line)
        if events:
            self.last_event_id = int(events[-1]["id"])
        elif not self.last_event_id and not log.lines:
            log.write(Text("no log lines yet", style="dim"))

    def _show_records(self, results: OverviewResults) -> None:
        box = self.query_one("#ov-records-box")
        box.display = bool(results.records)
        if results.records:
            parts = [
                render_json(doc, R_LABELS.get(name, name.replace("_", " "))) for name, doc in results.records.items()
            ]
            self.query_one("#ov-records", Static).update(Group(*parts))

    def _show_config(self, run: dict) -> None:
        config = flatten_config(run.get("config") or {})
        if config:
            rows = [(key, _value_text(value)) for key, value in config.items()]
            self.query_one("#ov-config", Static).update(_kv_table(rows))
        else:
            self.query_one("#ov-config", Static).update(Text("no configuration recorded", style="dim"))
        versions = run.get("versions") or {}
        if versions:
            self.query_one("#ov-versions", Static).update(_kv_table([(k, v or "—") for k, v in versions.items()]))
        self.query_one("#ov-versions-box").display = bool(versions)

    # events --------------------------------------------------------------------------------------
    @on(DataTable.RowSelected, "#ov-children")
    def _open_child(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.post_message(OpenRun(int(event.row_key.value)))


R_LABELS = {"determinism": "determinism", "qc_report": "quality control"}


def _path_and_hash(path, digest) -> str:
    if not path:
        return "—"
    return f"{path}" + (f"  ({str(digest)[:12]})" if digest else "")


def _value_text(value) -> str:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "; ".join(", ".join(f"{k}={_value_text(v)}" for k, v in item.items()) for item in value)
    if isinstance(value, list):
        return ", ".join(_value_text(v) for v in value) or "[]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value_text(v)}" for k, v in value.items()) or "{}"
    if isinstance(value, str):
        return value or '""'
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


NOT_LEARNED = "✘ did not learn"


def gate_reason(gate: dict) -> str:
    """Why a gate says a model did not learn, in one line."""
    reasons = [str(r) for r in gate.get("reasons") or () if r]
    if reasons:
        return "; ".join(reasons)
    parts = []
    if gate.get("predicted_class") is not None and gate.get("predicted_share") is not None:
        parts.append(f"predicts {gate['predicted_class']} for {fmt_num(float(gate['predicted_share']), 2)} of cells")
    if gate.get("balanced_accuracy") is not None:
        chance = f" (chance {fmt_num(float(gate['chance']), 3)})" if gate.get("chance") is not None else ""
        parts.append(f"balanced accuracy {fmt_num(float(gate['balanced_accuracy']), 3)}{chance}")
    return "; ".join(parts)


def render_results(results: OverviewResults):
    """Warnings, the task x mode table, the checkpoint check, then one block per analysis."""
    parts: list = []
    for warning in results.warnings:
        parts.append(Text(f"⚠ {warning.get('message')}", style="yellow"))
    summary = results.summary
    if summary.finetunes:
        parts.append(_finetune_table(results))
        for row in summary.finetunes:
            gate = results.gates.get(row.run_id)
            if R.did_not_learn(gate):
                reason = gate_reason(gate)
                parts.append(
                    Text(f"{NOT_LEARNED}: {row.task} {row.mode}" + (f": {reason}" if reason else ""), style="red")
                )
    if results.checkpoint:
        parts.append(_checkpoint_line(results.checkpoint))
    learned = {(row.task, row.mode): not R.did_not_learn(results.gates.get(row.run_id)) for row in summary.finetunes}
    for head in summary.analyses:
        parts.append(_analysis_block(head, results, learned))
    return Group(*parts)


def _finetune_table(results: OverviewResults) -> Table:
    summary = results.summary
    table = Table(box=None, padding=(0, 1), header_style="bold", pad_edge=False)
    table.add_column("task", no_wrap=True)
    table.add_column("mode", no_wrap=True)
    table.add_column("accuracy", justify="right", no_wrap=True)
    table.add_column("macro-F1", justify="right", no_wrap=True)
    with_base = any(results.baselines.get(r.run_id) for r in summary.finetunes)
    if with_base:
        table.add_column("baseline acc", justify="right", no_wrap=True)
        table.add_column("baseline F1", justify="right", no_wrap=True)
    table.add_column("best epoch", justify="right", no_wrap=True)
    best: dict[str, float] = {}
    for row in summary.finetunes:
        if row.macro_f1 is not None and not R.did_not_learn(results.gates.get(row.run_id)):
            best[row.task] = max(best.get(row.task, -1.0), row.macro_f1)
    previous = None
    for row in summary.finetunes:
        gate = results.gates.get(row.run_id)
        mode = Text(row.mode)
        if R.did_not_learn(gate):
            mode.append(" ✘", style="bold red")
        f1 = Text(fmt_num(row.macro_f1), style="bold green" if best.get(row.task) == row.macro_f1 else "")
        acc = Text(fmt_num(row.accuracy))
        if row.status == "running":
            acc.append(" (running)", style="yellow")
        cells: list = [row.task if row.task != previous else "", mode, acc, f1]
        previous = row.task
        if with_base:
            base = results.baselines.get(row.run_id, {})
            base_acc = base.get(R.METRIC_BASELINE_ACCURACY, base.get(R.METRIC_MAJORITY_RATE))
            cells += [fmt_num(base_acc), fmt_num(base.get(R.METRIC_BASELINE_MACRO_F1))]
        cells.append("—" if row.best_epoch is None else str(row.best_epoch))
        table.add_row(*cells)
    return table


def _checkpoint_line(doc: dict) -> Text:
    ok = doc.get("ok")
    line = Text("checkpoint check: ", style="bold")
    parts = []
    for key, label in (("top1", "top-1"), ("top10", "top-10")):
        if doc.get(key) is not None:
            base = doc.get(f"baseline_{key}")
            parts.append(
                f"{label} {fmt_num(float(doc[key]), 3)}"
                + (f" (baseline {fmt_num(float(base), 3)})" if base is not None else "")
            )
    if doc.get("cells") is not None:
        parts.append(f"{fmt_num(doc['cells'])} cells")
    line.append(", ".join(parts))
    if doc.get("message"):
        line.append(f"  {doc['message']}", style="" if ok is not False else "red")
    if ok is False:
        line.append("  ✘", style="bold red")
    return line


def q_of(record: dict, p_key: str = "p_value"):
    """The q-value of a record's p (`q` / `q_value`, `q_matched` for the matched null), None when absent."""
    if p_key == "p_matched":
        return record.get("q_matched")
    return record.get("q", record.get("q_value"))


def _p_of(record: dict, p_key: str = "p_value") -> str:
    return fmt_p_resolved(
        record.get(p_key), floor=record.get("p_floor"), at_floor=record.get("at_floor"), q=q_of(record, p_key)
    )


def _overlap_text(records: list[dict]) -> str:
    parts = []
    for r in records:
        extra = []
        if q_of(r) is not None:
            extra.append(f"q {fmt_q(q_of(r))}")
        if r.get("p_matched") is not None:
            matched_q = q_of(r, "p_matched")
            extra.append(
                f"matched p {_p_of(r, 'p_matched')}" + (f" q {fmt_q(matched_q)}" if matched_q is not None else "")
            )
        more = ", " + ", ".join(extra) if extra else ""
        parts.append(f"k={r.get('k')} {r.get('overlap')} (p {_p_of(r)}{more})")
    return "  ".join(parts)


def _analysis_block(head: R.AnalysisHeadline, results: OverviewResults, learned: dict) -> Group:
    models = head.models
    task = head.name.split(":", 1)[0] if ":" in head.name else ""

    def named(model: str) -> str:
        return model + ("" if learned.get((task, model), True) else f" ({NOT_LEARNED})")

    lines = [Text(""), Text(head.name or f"analysis {head.run_id}", style="bold underline")]
    if head.cosine_mean is not None:
        line = Text(f"cosine {named(models[0])} vs {named(models[1])}: mean {head.cosine_mean:.3f}")
        if head.cosine_per_layer:
            line.append("  per layer " + " ".join(f"{v:.2f}" for v in head.cosine_per_layer), style="cyan")
        if head.heads_differing is not None:
            total = f"/{head.n_heads_total}" if head.n_heads_total else ""
            line.append(f"  ·  {head.heads_differing}{total} heads differ (adj. p < {R.SIGNIFICANCE})")
        lines.append(line)
    # the key score where the run has it (the summed attention follows detection frequency), else attention
    genes_by_model = head.key_genes or head.top_genes
    for suffix, model in zip(R.MODEL_SUFFIXES, models):
        genes = genes_by_model.get(suffix)
        if genes:
            lines.append(Text(f"key genes {named(model)}: ", style="bold").append(", ".join(genes[:10]), style=""))
    if head.de_overlap:
        by = f" by {model_label(head.de_attention_column, models)}" if head.de_attention_column else ""
        directions = results.de_directions.get(head.run_id) or []
        up = next((d for d in directions if d.get("direction") == "up"), None)
        where = f", {up['label']}" if up and up.get("label") else ""
        line = Text(f"DE overlap{where} (top k{by}): ", style="bold")
        line.append(_overlap_text(head.de_overlap))
        lines.append(line)
        for block in directions:
            records = [r for r in block.get("overlap") or () if isinstance(r, dict) and "k" in r]
            if block is up or not records:
                continue
            label = block.get("label") or block.get("direction")
            lines.append(Text(f"DE overlap, {label}: ", style="bold").append(_overlap_text(records)))
        groups = results.de_groups.get(head.run_id) or []
        if len(groups) > 1:
            lines.append(Text(f"  ({groups[0]}; {len(groups) - 1} more comparisons in the DE tab)", style="dim"))
    for warning in head.key_warnings:
        lines.append(Text(f"warning: {in_model_words(warning, models)}", style="yellow"))
    if head.spearman and head.spearman.get("rho") is not None:
        rho, p = head.spearman.get("rho"), head.spearman.get("p_value")
        against = model_label(head.de_attention_column, models) if head.de_attention_column else "attention"
        lines.append(Text(f"Spearman DE score vs {against}: rho {rho:+.3f} (p {fmt_p(p)})"))
    for model in models:
        doc = results.deletion.get(head.run_id, {}).get(model)
        if doc:
            lines.append(Text(f"deletion from {named(model)}: ", style="bold").append(deletion_line(doc)))
    for model in models:
        doc = results.sanity.get(head.run_id, {}).get(model)
        if doc:
            lines.append(
                Text(f"randomisation cascade of {named(model)}: ", style="bold").append(sanity_line(doc, models))
            )
    for model in models:
        doc = results.attribution.get(head.run_id, {}).get(model)
        if doc:
            lines.append(Text(f"attribution of {named(model)}: ", style="bold").append(attribution_line(doc)))
    return Group(*lines)


def deletion_line(doc: dict) -> str:
    """Set deletion in one line: the document's headline, else the largest k of the first score."""
    if isinstance(doc.get("headline"), str) and doc["headline"]:
        return doc["headline"]
    rows = [r for r in doc.get("sets") or () if isinstance(r, dict) and r.get("k") is not None]
    if not rows:
        return "no sets deleted"
    score = rows[0].get("score")
    row = max((r for r in rows if r.get("score") == score), key=lambda r: r["k"])
    floor = 1.0 / (int(doc["n_random"]) + 1) if doc.get("n_random") else None
    p = fmt_deletion_p(row, floor)
    return (
        f"top {row['k']} by {str(score).replace('_', ' ')}: Δp {fmt_num(row.get('delta_prob_mean'), 3)} "
        f"vs random {fmt_num(row.get('random_delta_prob_mean'), 3)} (p {p})"
    )


def sanity_line(doc: dict, models) -> str:
    flagged = [model_label(str(c), models) for c in doc.get("flagged") or ()]
    return "scores that survive randomisation: " + (", ".join(flagged) if flagged else "none")


def attribution_line(doc: dict) -> str:
    methods = ", ".join(str(m) for m in doc.get("methods") or ())
    text = f"{methods} on {fmt_num(doc.get('n_cells'))} cells"
    gap = (
        (doc.get("completeness") or {}).get("relative_gap_total") if isinstance(doc.get("completeness"), dict) else None
    )
    if isinstance(gap, (int, float)):
        text += f"; completeness gap {gap:.1%}"
    return text
