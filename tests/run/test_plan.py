"""The cost plan (`pipeline.run.plan`, `gfattn pipeline --plan`): its counts against direct counts of what the
stages run, the stage list against `_stages`, `--plan` recording nothing, and the plan stored on a run."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import config
from pipeline.run import plan as P


def _shape(cfg, **kw):
    rng = np.random.default_rng(0)
    n = 60
    split = np.array(["train"] * 40 + ["validation"] * 8 + ["test"] * 12)
    lists = [rng.choice(np.arange(10, 60), size=int(rng.integers(5, 20)), replace=False).tolist() for _ in range(n)]
    args = dict(
        n_obs=80,
        split=split,
        lengths=np.array([len(x) for x in lists]),
        token_lists=lists,
        special_ids=(),
        n_layers=3,
        de_comparisons=[("lowhigh", "high", "low")],
    )
    args.update(kw)
    return P.build_shape(cfg, **args)


# ------------------------------------------------------------------------------------------ direct counts
def test_hao_passes_equal_a_direct_count_of_the_layers_each_alpha_runs():
    n_cells, steps, nl, batch = 13, 4, 5, 4
    layer_evals, forwards = 0, 0
    for start in range(0, n_cells, batch):  # hao_attribution's loops: batches, layers, alphas, layers l..L-1
        b = min(batch, n_cells - start)
        forwards += b
        for layer_idx in range(nl):
            for _alpha in range(steps):
                layer_evals += b * len(range(layer_idx, nl))
    fwd, grad = P.hao_passes(n_cells, steps, nl)
    assert fwd == forwards
    assert grad == pytest.approx(layer_evals / nl)


def test_finetune_passes_equal_a_direct_count_of_the_epochs():
    cfg = config.resolve("quick")
    shape = _shape(cfg)
    epochs = 3
    train, val, test = 40, 8, 12
    for mode, trainable in (("unfrozen", 3), ("last-1", 1), ("freeze-1", 2)):
        fwd = fb = 0.0
        for _ in range(epochs):
            fb += train * trainable / 3  # back-propagation through the trainable layers' share
            fwd += train * (3 - trainable) / 3 + val
        fwd += test
        assert P.finetune_passes(mode, shape, epochs) == (pytest.approx(fwd), pytest.approx(fb))
    assert P.finetune_passes("frozen", shape, epochs) == (train + val + test, 0.0)  # encoded once


def test_deletion_shape_against_a_naive_count():
    rng = np.random.default_rng(3)
    lists = [rng.choice(30, size=int(rng.integers(1, 12)), replace=False).tolist() for _ in range(50)]
    fractions, single, n_genes, typical = P.deletion_shape(lists, special_ids=(0,), ks=(1, 3), top=4, min_cells=5)
    freq = {}
    for cell in lists:
        for t in set(cell) - {0}:
            freq[t] = freq.get(t, 0) + 1
    order = sorted(freq, key=lambda t: (-freq[t], t))
    for k in (1, 3):
        top = set(order[:k])
        assert fractions[k] == pytest.approx(np.mean([bool(top & set(c)) for c in lists]))
    assert single == pytest.approx(np.mean([freq[t] for t in order[:4]]) / 50)
    assert n_genes == len(freq)
    assert typical == pytest.approx(np.median([c for c in freq.values() if c >= 5]) / 50)


def test_deletion_passes_count_baseline_sets_and_single_genes():
    cfg = config.resolve("quick")
    shape = _shape(cfg)
    a = cfg["analysis"]
    scores = ["key_score", "attn", "attn_norm", *a["attribution"], "de"]
    ks = [k for k in a["deletion_k"] if k <= shape.n_genes // 2]
    f = shape.typical_fraction
    pairs = singles = 0.0
    for score in scores:  # attention's rankings follow detection frequency; the others hold typical genes
        frequent = score in ("attn", "attn_norm")
        for k in ks:
            touched = shape.deletion_fraction[k] if frequent else 1 - (1 - f) ** k
            pairs += (1 + a["deletion_random_sets"]) * touched * 12
        singles += a["deletion_top_genes"] * (shape.single_fraction if frequent else f) * 12
    assert P.deletion_passes(cfg, shape, 12, True) == pytest.approx(12 + pairs + singles)


def test_the_plan_names_the_stages_the_run_executes(monkeypatch):
    """`_stages` with every stage function stubbed: the stage names it enters are the plan's."""
    from pipeline.run import driver as E

    cfg = config.resolve(
        "default", None, {"analysis.label_permutation": True, "train.modes": ["frozen", "unfrozen", "last-1"]}
    )
    for name in ("stage_data", "stage_model", "stage_tokenize", "stage_record_data", "stage_finetune"):
        monkeypatch.setattr(E, name, lambda *a, **k: None)
    monkeypatch.setattr(E, "stage_de", lambda *a, **k: None)
    monkeypatch.setattr(E, "stage_attention", lambda *a, **k: None)
    monkeypatch.setattr(E, "stage_model_analysis", lambda *a, **k: None)
    from pipeline.analysis import deletion_report

    monkeypatch.setattr(deletion_report, "adjust_run_deletion_family", lambda *a, **k: None)
    monkeypatch.setattr(P, "record_plan", lambda *a: None)
    entered = []

    class Rep:
        @contextmanager
        def stage(self, name):
            entered.append(name)
            yield self

        def skip(self, name, why):
            pass

    names = {"dose": ["0 uM", "1.25 uM", "2.5 uM", "12.5 uM", "25 uM"], "lowhigh": ["low", "high"]}
    ctx = SimpleNamespace(
        cfg=cfg,
        rep=Rep(),
        threads=1,
        has_counts=True,
        out=SimpleNamespace(selection=SimpleNamespace(names=names), analysis_workers=None, finetune_workers=None),
        store=None,
        run_id=0,
    )
    E._stages(ctx)
    shape = _shape(cfg, de_comparisons=E.de_comparisons(cfg, ctx.out.selection))
    planned = list(dict.fromkeys(p.stage for p in P.count_stages(cfg, shape) if p.stage != "(start)"))
    assert planned == entered


def test_every_stage_of_every_counted_preset_has_work_and_a_positive_estimate():
    timing = {"lengths": [5, 20], **{k: [1e-4, 4e-4] for k in P.KINDS}}
    for preset in ("default", "quick", "thesis-synthetic"):
        cfg = config.resolve(preset)
        shape = _shape(cfg, pretrain_cells=100)
        parts = P.count_stages(cfg, shape)
        total = P.estimate(parts, P.unit_costs(timing, shape.lengths))
        assert total > 0
        assert all(p.seconds > 0 for p in parts), [(p.stage, p.part) for p in parts if p.seconds <= 0]
        analysis = [p for p in parts if p.stage.startswith(("attention", "model"))]
        assert {p.part.split(" (")[0] for p in analysis} >= {
            "attention",
            "attribution hao",
            "attribution ig",
            "attribution rollout",
            "deletion",
            "randomisation cascade",
        }


def test_unit_costs_interpolate_between_the_timed_lengths():
    timing = {"lengths": [10, 30], "forward": [1.0, 3.0]}
    assert P.unit_costs(timing, [10, 20, 30])["forward"] == pytest.approx(2.0)
    assert P.unit_costs(timing, [40])["forward"] == pytest.approx(3.0)  # constant beyond the timed lengths


# ------------------------------------------------------------------------------------------ --plan
@pytest.fixture(scope="module")
def quick_plan(tmp_path_factory, capsys_module=None):
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("plan")
    db = root / "gfattn.db"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["pipeline", "--quick", "--plan", "--store", str(db)])
    return db, code, out.getvalue()


def test_plan_prints_every_stage_and_records_nothing(quick_plan):
    db, code, text = quick_plan
    assert code == 0
    assert "estimated total" in text
    for stage in ("data", "model", "tokenize", "record", "finetune lowhigh/unfrozen", "de", "attention lowhigh"):
        assert f"\n{stage}" in text, stage
    for part in ("attribution hao", "attribution ig", "deletion", "randomisation cascade"):
        assert part in text
    assert not db.exists()  # no store: nothing recorded


def test_plan_refuses_what_a_run_refuses(tmp_path, capsys):
    from pipeline.cli import main

    db = tmp_path / "g.db"
    assert main(["pipeline", "--preset", "sciplex2-nutlin", "--plan", "--store", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0]
    assert not db.exists()


def test_format_plan_renders_a_stored_plan_dict():
    cfg = config.resolve("quick")
    shape = _shape(cfg)
    parts = P.count_stages(cfg, shape)
    P.estimate(parts, P.unit_costs({"lengths": [10], **{k: [1e-3] for k in P.KINDS}}, shape.lengths))
    plan = {"preset": "quick", "stages": [vars(p) for p in parts], "total_s": sum(p.seconds for p in parts)}
    lines = P.format_plan(plan)
    assert any(line.startswith("estimated total") for line in lines)
    assert P.stage_estimates(plan)["finetune lowhigh/unfrozen"] > 0


def test_a_run_stores_its_plan(quick_run):
    from store import Store
    from store import results as R

    db, _ = quick_run
    with Store(db) as st:
        run = st.list_runs(kind="pipeline")[0]
        plan = R.run_plan(st, run["id"])
    assert plan is not None and plan["total_s"] > 0
    estimates = P.stage_estimates(plan)
    assert all(v > 0 for v in estimates.values())
    assert "attention lowhigh: frozen vs unfrozen" in estimates


# ------------------------------------------------------------------------------------------ process count
def test_compare_says_when_two_runs_fine_tuned_in_different_process_counts(tmp_path):
    from pipeline.commands.compare import compare_text
    from store import Store
    from store import results as R

    with Store(tmp_path / "g.db") as st:
        one = st.create_run("one", "pipeline", {"compute": {"nproc": 1}})
        two = st.create_run("two", "pipeline", {"compute": {"nproc": 2}})
        child = st.create_run("lowhigh/frozen", "finetune", {"task": "lowhigh"}, parent_id=two)
        alone = st.create_run("alone", "finetune", {"nproc": 3})
        assert [R.run_process_count(st, r) for r in (one, two, child, alone)] == [1, 2, 2, 3]
        assert "not bit-identical" in compare_text(st, one, two)
        assert "process" not in compare_text(st, one, one)


# ------------------------------------------------------------------------------------------ ETA from the plan
def test_a_stage_reports_its_planned_eta_from_its_first_update(monkeypatch):
    import io

    from pipeline import progress

    clock = {"t": 1000.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["t"])
    calls = []

    class Store:
        def set_stage(self, *a, **k):
            pass

        def log_event(self, *a, **k):
            pass

        def set_progress(self, run_id, stage, done, total, **kw):
            calls.append((stage, done, total, kw.get("eta_s")))

    rep = progress.Reporter(Store(), 1, stream=io.StringIO(), min_interval_s=0.0)
    rep.estimates = {"attention t: a vs b": 100.0}
    with rep.stage("attention t: a vs b"):
        assert calls[-1] == ("attention t: a vs b", 0, None, 100.0)  # at once, before any work
        clock["t"] += 10
        rep.update(1, 100, unit="cells")
        assert calls[-1][3] == pytest.approx(90.0)  # planned time left
        clock["t"] += 10
        rep.update(50, 100, unit="cells")
        assert calls[-1][3] == pytest.approx(20.0)  # past a fifth of the work: the measured rate
    with rep.stage("unplanned"):
        clock["t"] += 10
        rep.update(1, 4)
        assert calls[-1][3] == pytest.approx(30.0)


def test_timing_a_tiny_model_gives_positive_costs_and_leaves_the_random_state_alone():
    import torch
    from transformers import BertConfig

    cfg = config.resolve("quick")
    shape = _shape(cfg)
    tiny = BertConfig(
        vocab_size=70,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
    )
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    model = P.timing_model(tiny, 2, seed=0)
    plan = P.make_plan(cfg, shape, model, device="cpu", repeats=1)
    assert torch.equal(torch.rand(3), expected)  # the run's own draws are not moved by the timing
    assert plan["timing"]["lengths"] == P.representative_lengths(shape.lengths)
    assert all(v > 0 for k in P.KINDS for v in plan["timing"][k])
    assert all(v > 0 for v in P.stage_estimates(plan).values())
    assert plan["total_s"] == pytest.approx(sum(row["seconds"] for row in plan["stages"]))


def test_each_stage_on_cuda_records_its_peak_gpu_memory(monkeypatch):
    """The stage hook with a stand-in for torch.cuda (no GPU here): reset at the stage's start, the peak read
    at its end, logged and kept as JSON `gpu_memory` per stage."""
    import io
    import sys

    from pipeline import progress

    class Cuda:
        peak, resets = 0, 0

        def is_available(self):
            return True

        def is_initialized(self):
            return True

        def reset_peak_memory_stats(self):
            Cuda.resets += 1
            Cuda.peak = 0

        def max_memory_allocated(self):
            return Cuda.peak

    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=Cuda()))
    stored = {}

    class Store:
        def set_stage(self, *a, **k):
            pass

        def log_event(self, *a, **k):
            pass

        def put_json(self, run_id, name, doc):
            stored[name] = doc

    rep = progress.Reporter(Store(), 1, stream=io.StringIO())
    for stage, peak in (("finetune t/unfrozen", 3 * 2**20), ("attention t: a vs b", 5 * 2**20)):
        with rep.stage(stage):
            Cuda.peak = peak
    assert Cuda.resets == 2
    assert stored[progress.GPU_MEMORY_JSON] == {"finetune t/unfrozen": 3 * 2**20, "attention t: a vs b": 5 * 2**20}
    from store import results as R

    assert R.JSON_GPU_MEMORY == progress.GPU_MEMORY_JSON


@pytest.mark.parametrize(
    "share, prefix",
    [(P.shard_model_stages, "model "), (P.share_finetune_stages, "finetune ")],
    ids=["analysis", "fine-tuning"],
)
def test_n_processes_share_each_stage_and_start_once_per_run(share, prefix):
    """With N processes (a sharded analysis, `compute.analysis_nproc`; data-parallel fine-tuning,
    `compute.nproc`) each of their stages' passes take 1/N of the time; the processes start once per run when
    the cells are tokenized, and what of their start the stages before the first of their stages do not
    cover is one more part of that stage; other stages keep their time, and one process changes nothing."""
    cfg = config.resolve("default")
    timing = {"lengths": [5, 20], **{k: [1e-4, 4e-4] for k in P.KINDS}}
    shape = _shape(cfg, pretrain_cells=100)
    one = P.count_stages(cfg, shape)
    P.estimate(one, P.unit_costs(timing, shape.lengths))
    two = P.count_stages(cfg, shape)
    P.estimate(two, P.unit_costs(timing, shape.lengths))
    share(two, 2)
    (start,) = [p for p in two if p.part.startswith("start of 2 processes")]
    first = next(i for i, p in enumerate(one) if p.stage.startswith(prefix))
    tokenized = next(i for i, p in enumerate(one) if p.stage == "tokenize")
    covered = sum(p.seconds for p in one[tokenized + 1 : first])
    assert start.stage == one[first].stage and start.seconds == pytest.approx(max(0.0, P.ROUGH["processes"] - covered))
    rest = [p for p in two if p is not start]
    assert [(p.stage, p.part) for p in rest] == [(p.stage, p.part) for p in one]
    for a, b in zip(one, rest):
        expected = a.fixed_s + (a.seconds - a.fixed_s) / 2 if a.stage.startswith(prefix) else a.seconds
        assert b.seconds == pytest.approx(expected)
    before = [(p.stage, p.part, p.seconds) for p in one]
    share(one, 1)
    assert [(p.stage, p.part, p.seconds) for p in one] == before
    # stages shorter than the start leave the rest of it to the first of the processes' stages
    short = [P.Part("tokenize"), P.Part("record", seconds=3.0), P.Part(f"{prefix}t: a", seconds=10.0)]
    share(short, 2)
    assert [(p.part, p.seconds) for p in short[2:]] == [
        ("start of 2 processes (torchrun)", P.ROUGH["processes"] - 3.0),
        ("", 5.0),
    ]
