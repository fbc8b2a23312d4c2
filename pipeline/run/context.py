"""The run's context: its configuration, store, reporter, cache and device (`Context`), and what the stages
hand on to later stages (`Products`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.progress import Reporter
from pipeline.run.preflight import Preflight


# -------------------------------------------------------------------------------------------- context
@dataclass
class Products:
    """What the stages hand on to later stages (typed; filled in stage order)."""

    data_path: str = ""
    data_hash: str | None = None
    selection: Any = None  # pipeline.data.design.Selection
    split: np.ndarray | None = None
    model_dir: Path | None = None
    dicts: Any = None  # pipeline.data.dictionaries.GeneDictionaries
    max_len: int = 0
    dataset: Any = None  # datasets.Dataset of the selected cells, in selection order
    tokenize_report: dict = field(default_factory=dict)
    models: dict[tuple[str, str], Path] = field(default_factory=dict)
    checkpoint_hashes: dict[tuple[str, str], str] = field(default_factory=dict)
    de: dict[tuple[str, str, str], Any] = field(default_factory=dict)  # (task, group, reference) -> DE table
    pretrain_metrics: dict = field(default_factory=dict)
    gates: dict[tuple[str, str], dict] = field(default_factory=dict)  # (task, mode) -> results.JSON_GATE document
    # the run's `pipeline.parallel.analyse.AnalysisWorkers` (`compute.analysis_nproc` above 1), once started
    analysis_workers: Any = None
    # the run's fine-tuning processes (`pipeline.parallel.launch.JobWorkers`, `compute.nproc` above 1)
    finetune_workers: Any = None


@dataclass
class Context:
    cfg: dict
    store: object
    run_id: int
    rep: Reporter
    cache: Path
    device: str
    out: Products = field(default_factory=Products)
    preflight: Preflight | None = None
    threads: int = 1  # torch CPU threads of every stage (`compute.pin_threads`)
    _adata: Any = None

    @property
    def seed(self) -> int:
        return int(self.cfg["run"]["seed"])

    @property
    def has_counts(self) -> bool:
        """False for a tokenized dataset: no UMAP, no DE (both need the counts)."""
        return not self.cfg["data"]["tokenized"]

    def selected_adata(self):
        """The selected cells' AnnData (X in memory), read from the data file once per process."""
        if self._adata is None:
            from pipeline.data.counts import read_selected

            self._adata = read_selected(self.out.data_path, self.out.selection.index)
        return self._adata

    def completed_child(self, name: str, kind: str) -> int | None:
        """The id of a completed child run of this name (when resuming), else None; stale ones are removed."""
        found = None
        for c in self.store.children(self.run_id):
            if c["name"] == name and c["kind"] == kind:
                if c["status"] == "completed" and found is None:
                    found = c["id"]
                else:
                    self.store.delete_run(c["id"])
        return found

    def new_child(self, name: str, kind: str, config: dict | None = None, **kw) -> int:
        return self.store.create_run(name, kind, config or {}, parent_id=self.run_id, device=self.device, **kw)

    def warn(self, kind: str, message: str, **detail) -> None:
        """A warning the researcher must see where the result is shown: printed now, logged as an event, and
        kept on the pipeline run (`results.JSON_WARNINGS`, read by `results.run_warnings`) for the summary,
        `gfattn show` and the TUI. `kind` groups them ("checkpoint", "gate", "integrated_gradients", ...)."""
        from store import results as R

        self.rep.line(f"warning: {message}", level="warning")
        found = R.run_warnings(self.store, self.run_id)
        entry = {"kind": kind, "message": message, **detail}
        if entry not in found:  # a resumed stage says the same thing once
            self.store.put_json(self.run_id, R.JSON_WARNINGS, [*found, entry])
