"""Several processes: each analyses every world-th batch and the sums are all-reduced.

The collective calls are replaced by an in-process stand-in for two ranks run one after the other: rank 1
records its tensors, rank 0 receives their sum, exactly what `all_reduce(SUM)` and `all_gather_object`
return. (A real two-process gloo run gives the same; it costs too long to start for the test suite.)
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.analysis.attention import analyze_attention

from tests.analysis.test_attention_engine import ADDITIVE, PAD, SPECIAL, assert_results_close, tiny_bert, v2_cells


class FakeGroup:
    def __init__(self):
        self.recorded: list = []  # rank 1's tensors and objects, in call order
        self.rank = 1
        self.calls = 0

    def all_reduce(self, tensor, op=None):
        if self.rank == 1:
            self.recorded.append(tensor.clone())
        else:
            tensor += self.recorded[self.calls]
            self.calls += 1

    def all_gather_object(self, out, obj):
        if self.rank == 1:
            self.recorded.append(obj)
            out[:] = [obj, obj]
        else:
            out[:] = [obj, self.recorded[self.calls]]
            self.calls += 1


def test_all_reduced_ranks_equal_one_process(monkeypatch):
    import torch.distributed as dist

    import pipeline.analysis.attention as attention

    models = tiny_bert(1), tiny_bert(2)
    data = v2_cells(9, seed=6)
    kw = dict(pad_id=PAD, special_ids=SPECIAL, group_column="dose", batch_size=2, dtype=torch.float64)
    whole = analyze_attention(*models, data, **kw)

    group = FakeGroup()
    monkeypatch.setattr(attention, "_shard", lambda: (group.rank, 2))
    monkeypatch.setattr(dist, "all_reduce", group.all_reduce)
    monkeypatch.setattr(dist, "all_gather_object", group.all_gather_object)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    rank1 = analyze_attention(*models, data, **kw)
    group.rank = 0
    rank0 = analyze_attention(*models, data, **kw)

    assert_results_close(rank0, whole, rtol=1e-12)
    # rank 1 alone saw only its batches
    assert rank1.rank_count.sum() < whole.rank_count.sum()
    assert set(ADDITIVE) >= {"cell_cosine", "gene_sum"}
    assert np.all(rank0.lengths == whole.lengths)
