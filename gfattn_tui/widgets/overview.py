"""Overview tab: the results first (a pipeline's task x mode table of test accuracy, macro-F1 and best
epoch, each analysis's headline: mean cosine per layer, key genes (by the key score where stored), DE
overlap with its p-value and matched p, the detection-frequency warnings; deletion and attribution
headlines when stored; a finetune's own metrics), then provenance, the error in full, stages with
progress and ETA, child runs, the log tail, the resolved configuration and package versions."""

from __future__ import annotations

import json

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Label, ProgressBar, RichLog, Static

from gfattn_tui.format import STATUS_MARKS, as_epoch, fmt_duration, fmt_num, fmt_p, fmt_time, run_duration
from gfattn_tui.json_render import render_json
from gfattn_tui.messages import Loaded, OpenRun
from gfattn_tui.widgets.store_view import RunView
from store import results as R
from store.results import flatten_config


def _kv_table(rows: list[tuple[str, object]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else Text(str(value)))
    return table


class OverviewView(RunView, VerticalScroll):
    """Everything about the run itself; the log and progress update live."""

    def __init__(self, run_id: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.stale = True
        self.last_event_id = 0
        self.run: dict | None = None

    def compose(self) -> ComposeResult:
        yield Label("Results", classes="section", id="ov-results-title")
        yield Static("", id="ov-results")
        yield Label("Run", classes="section")
        yield Static("", id="ov-summary")
        yield Static("", id="ov-error", classes="error-box")
        yield Label("", id="ov-progress-label")
        yield ProgressBar(id="ov-progress", show_eta=False)
        yield Label("Stages", classes="section")
        yield Static("", id="ov-stages")
        yield Label("Child runs  (enter opens)", classes="section", id="ov-children-title")
        yield DataTable(id="ov-children", cursor_type="row")
        yield Label("Log", classes="section")
        yield RichLog(id="ov-log", max_lines=self.app.config.log_lines, wrap=True, markup=False)
        yield Label("Configuration", classes="section")
        yield Static("", id="ov-config")
        yield Label("Versions", classes="section")
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
                "results": R.read_results_summary(st, run_id),
            }

        self.post_message(Loaded("overview", self.client.call(read)))

    def on_loaded(self, message: Loaded) -> None:
        data = message.data
        run = self.run = data["run"]
        utc = self.app.config.utc
        now = self.app.now()
        self._show_results(data["results"])
        self._show_summary(run, utc, now)
        self._show_error(run, data["children"])
        self._show_progress(run, data["stages"])
        self._show_stages(data["stages"], utc, now, run)
        self._show_children(data["children"], now)
        self._append_events(data["events"], utc)
        self._show_config(run)

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

    def _show_results(self, results: R.ResultsSummary) -> None:
        box = self.query_one("#ov-results", Static)
        box.display = self.query_one("#ov-results-title").display = not results.empty
        if not results.empty:
            box.update(render_results(results))

    def _show_progress(self, run: dict, stages: list[dict]) -> None:
        bar = self.query_one("#ov-progress", ProgressBar)
        label = self.query_one("#ov-progress-label", Label)
        overall = R.stage_progress(stages, run.get("progress"))
        # the progress row of a stage that has ended is stale: show it only while its stage runs
        progress = overall.progress if stages else run.get("progress")
        show = run.get("status") == "running" and (bool(progress) or bool(overall.total))
        bar.display = label.display = show
        if not show:
            return
        prefix = f"stage {min(overall.done + 1, overall.total)}/{overall.total}" if overall.total else ""
        if not progress:
            label.update(f"{prefix}: {overall.current or 'between stages'}")
            bar.update(total=overall.total or None, progress=overall.done)
            return
        done, total = progress.get("done") or 0, progress.get("total")
        unit = progress.get("unit") or ""
        text = (f"{prefix} · " if prefix else "") + f"{progress.get('stage')}: {fmt_num(done, 0)}"
        text += (f" / {fmt_num(total, 0)}" if total else "") + f" {unit}"
        if progress.get("throughput"):
            text += f"  ·  {fmt_num(progress['throughput'], 1)} {unit}/s"
        if progress.get("eta_s") is not None:
            text += f"  ·  ETA {fmt_duration(progress['eta_s'])}"
        label.update(text)
        bar.update(total=total if total else None, progress=done)

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
        visible = bool(children)
        table.display = visible
        self.query_one("#ov-children-title").display = visible
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

    # events --------------------------------------------------------------------------------------
    @on(DataTable.RowSelected, "#ov-children")
    def _open_child(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.post_message(OpenRun(int(event.row_key.value)))


def _path_and_hash(path, digest) -> str:
    if not path:
        return "—"
    return f"{path}" + (f"  ({str(digest)[:12]})" if digest else "")


def _value_text(value) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, str):
        return value or '""'
    return str(value)


def render_results(results: R.ResultsSummary):
    """The task x mode table, then one block per analysis, then further headlines."""
    parts: list = []
    if results.finetunes:
        table = Table(box=None, padding=(0, 1), header_style="bold", pad_edge=False)
        for col, justify in (("task", "left"), ("mode", "left"), ("accuracy", "right"), ("macro-F1", "right")):
            table.add_column(col, justify=justify, no_wrap=True)
        table.add_column("best epoch", justify="right", no_wrap=True)
        best: dict[str, float] = {}
        for row in results.finetunes:
            if row.accuracy is not None:
                best[row.task] = max(best.get(row.task, -1.0), row.accuracy)
        for row in results.finetunes:
            acc = Text(fmt_num(row.accuracy), style="bold green" if best.get(row.task) == row.accuracy else "")
            if row.status == "running":
                acc.append(" (running)", style="yellow")
            table.add_row(
                row.task, row.mode, acc, fmt_num(row.macro_f1), "—" if row.best_epoch is None else str(row.best_epoch)
            )
        parts.append(table)
    for head in results.analyses:
        parts.append(_analysis_block(head))
    for name, doc in results.extra.items():
        if isinstance(doc, dict) and isinstance(doc.get("headline"), str):
            # a document with its own one-line headline (deletion: in full on the Key genes tab)
            parts.append(Group(Text(""), Text(name, style="bold underline"), Text(doc["headline"])))
        else:
            parts.append(render_json(doc, name))
    return Group(*parts)


def _analysis_block(head: R.AnalysisHeadline) -> Group:
    a, b = head.models
    lines = [Text(head.name or f"analysis {head.run_id}", style="bold underline")]
    if head.cosine_mean is not None:
        line = Text(f"cosine {a} vs {b}: mean {head.cosine_mean:.3f}")
        if head.cosine_per_layer:
            line.append("  per layer " + " ".join(f"{v:.2f}" for v in head.cosine_per_layer), style="cyan")
        if head.heads_differing is not None:
            total = f"/{head.n_heads_total}" if head.n_heads_total else ""
            line.append(f"  ·  {head.heads_differing}{total} heads differ (adj. p < {R.SIGNIFICANCE})")
        lines.append(line)
    # the key score where the run has it (the summed attention follows detection frequency), else attention
    genes_by_model = head.key_genes or head.top_genes
    for suffix, model in zip(R.MODEL_SUFFIXES, head.models):
        genes = genes_by_model.get(suffix)
        if genes:
            lines.append(Text(f"key genes {model}: ", style="bold").append(", ".join(genes[:10]), style=""))
    if head.de_overlap:
        by = f" by {head.de_attention_column}" if head.de_attention_column else ""
        line = Text(f"DE overlap (top k{by}): ", style="bold")
        for r in head.de_overlap:
            matched = f", matched p {fmt_p(r.get('p_matched'))}" if r.get("p_matched") is not None else ""
            line.append(f"k={r.get('k')} {r.get('overlap')} (p {fmt_p(r.get('p_value'))}{matched})  ")
        lines.append(line)
    for warning in head.key_warnings:
        lines.append(Text(f"warning: {warning}", style="yellow"))
    if head.spearman and head.spearman.get("rho") is not None:
        rho, p = head.spearman.get("rho"), head.spearman.get("p_value")
        against = head.de_attention_column or "attention"
        lines.append(Text(f"Spearman DE score vs {against}: rho {rho:+.3f} (p {fmt_p(p)})"))
    return Group(Text(""), *lines)
