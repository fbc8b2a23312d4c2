"""`Reporter.callback`: the one throttled progress printer the commands and the pipeline share."""

import io

from pipeline.progress import Reporter


class _Store:
    def __init__(self):
        self.progress, self.stages = [], []

    def set_progress(self, run_id, stage, done, total, **kw):
        self.progress.append((run_id, stage, done, total, kw.get("unit")))

    def set_stage(self, run_id, stage, status):
        self.stages.append((stage, status))

    def log_event(self, *a, **kw):
        pass


def test_callback_prints_throttled_lines_under_its_stage_label():
    out = io.StringIO()
    rep = Reporter(stream=out)
    progress = rep.callback("steps", stage="finetune")
    progress(1, 10, throughput=2.0, eta_s=4.5, message="loss 0.7")
    progress(2, 10)  # within the interval: not printed
    progress(10, 10)  # the last step always is
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].split(None, 1)[1] == "finetune   1/10 steps, 2.0 steps/s, ETA 4 s, loss 0.7"
    assert lines[1].split(None, 1)[1] == "finetune   10/10 steps"
    assert rep._stage is None  # the label does not leak into later lines


def test_callback_records_progress_in_the_store_without_touching_stages():
    store = _Store()
    rep = Reporter(store, 7, stream=io.StringIO())
    progress = rep.callback("cells", stage="attention")
    progress(4, 8)
    progress(8, 8)
    assert store.progress[0] == (7, "attention", 4, 8, "cells") and store.progress[-1][2:] == (8, 8, "cells")
    assert store.stages == []
