"""gfattn's own small model: the embedded default's (pretrained on a synthetic corpus) and the one pretrained
on a user's training cells when no checkpoint is given.

The embedded model is a function of its recipe: the `[pretrain]` config, the synthetic preset and the
model seed (`pretrain.seed`, or the run's seed when it is -1). `recipe_key` digests it; the pipeline caches
a model under that key and reuses it after checking its manifest.

The `default` preset's model ships with gfattn (`SHIPPED_DIR`), built once by

    gfattn pretrain --embedded --out DIR          # the default preset's recipe, seed 0

and used whenever a run's recipe key equals the one recorded in its `gfattn_recipe.json`; its manifest
(sha256 of every file) is checked first, and a mismatch is an error, never a quiet reuse. Rebuilding
it is deterministic on one machine and software stack (one CPU thread, `recipe["threads"]`, no time
budget): the same weights bit for bit (`tests/models/test_embedded_model.py`, marked slow, compares them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from pipeline.errors import InputError

SHIPPED_DIR = Path(__file__).resolve().parent / "embedded_model"
RECIPE_FILE = "gfattn_recipe.json"
RECIPE_VERSION = 4  # 4: <cls> tokens, the dosed cell line in the corpus, the model seed
METRICS_FILE = "gfattn_pretrain.json"  # the pretraining metrics: they include timings, so a rebuild differs there


def model_seed(pcfg: dict, run_seed: int) -> int:
    """The embedded model's seed: `pretrain.seed`, or the run's seed when it is -1."""
    seed = int(pcfg.get("seed", -1))
    return int(run_seed) if seed < 0 else seed


def recipe(pcfg: dict, preset: str, seed: int) -> dict:
    """What the embedded model is a function of (besides the code): pretraining config, preset, seed."""
    return {"pretrain": dict(pcfg), "preset": str(preset), "seed": int(seed), "v": RECIPE_VERSION}


def recipe_key(rec: dict) -> str:
    """The cache key of a recipe (`pipeline.io.digest`, like every cache key)."""
    from pipeline.io import digest

    return digest(rec)


def shipped_model(key: str, shipped_dir: Path = SHIPPED_DIR) -> Path | None:
    """The shipped model's folder when its recipe key is `key` (its manifest verified), else None."""
    from pipeline.io import verify_manifest

    meta = shipped_dir / RECIPE_FILE
    if not meta.is_file():
        return None
    try:
        shipped_key = json.loads(meta.read_text())["key"]
    except (ValueError, KeyError, OSError):
        raise InputError(f"{meta} is damaged; reinstall gfattn or rebuild the model (see its README)") from None
    if shipped_key != key:
        return None
    verify_manifest(
        shipped_dir,
        what="the embedded model shipped with gfattn,",
        fix="reinstall gfattn, or rebuild it with `gfattn pretrain --embedded --out DIR` and copy DIR there",
    )
    return shipped_dir


def pretrain_small_model(
    pcfg: dict, corpus_ds, dicts, out: Path, *, seed: int, device: str, progress: Callable | None = None
) -> dict:
    """gfattn's small BERT pretrained by masked genes (the `pretrain` config) into `out`, published whole
    with a manifest; the first complete copy wins when two processes race."""
    from pipeline.io import staging_dir, write_manifest
    from pipeline.models.pretrain import pretrain

    with staging_dir(out, replace=False) as tmp:
        metrics = pretrain(
            corpus_ds,
            dicts,
            tmp,
            layers=int(pcfg["layers"]),
            hidden=int(pcfg["hidden"]),
            heads=int(pcfg["heads"]),
            intermediate=int(pcfg["intermediate"]),
            max_len=int(pcfg["max_len"]),
            epochs=int(pcfg["epochs"]),
            batch_size=int(pcfg["batch_size"]),
            lr=float(pcfg["lr"]),
            seed=int(seed),
            time_budget_s=float(pcfg["time_budget_s"]) or None,
            cell_loss_weight=float(pcfg.get("cell_loss_weight", 0.0)),
            cell_objective=str(pcfg.get("cell_objective", "genes")),
            cell_components=int(pcfg.get("cell_components", 32)),
            device=device,
            progress=progress,
        )
        write_manifest(tmp)
    return metrics


def corpus_for(pcfg: dict, preset: str, seed: int):
    """The embedded model's vocabulary and tokenized synthetic corpus."""
    from pipeline.data.synth import make_corpus
    from pipeline.tokenize.encode import build_vocabulary, tokenize_anndata

    kind = str(pcfg.get("corpus", "healthy"))
    if kind not in ("healthy", "atlas"):
        raise InputError(f"pretrain.corpus {kind!r}: use 'healthy' or 'atlas'")
    # the corpus shares the synthetic data's gene universe, so the vocabulary covers the data
    corpus = make_corpus(
        n_cells=int(pcfg["corpus_cells"]),
        seed=int(seed) + 1,
        preset=preset,
        atlas=kind == "atlas",
        lineage_cells=int(pcfg.get("lineage_cells", 0)),
    )
    dicts = build_vocabulary(corpus, special_tokens=bool(pcfg.get("cls_token", False)))
    corpus_ds, _ = tokenize_anndata(corpus, dicts, max_len=int(pcfg["max_len"]))
    return dicts, corpus_ds


def build_embedded(
    pcfg: dict,
    preset: str,
    seed: int,
    out: Path,
    *,
    device: str = "cpu",
    threads: int = 1,
    progress: Callable | None = None,
    config_preset: str = "default",
) -> dict:
    """Pretrain the embedded model of a recipe into `out` (with `gfattn_recipe.json` and a manifest);
    `config_preset` names the pipeline preset whose recipe it is, for the rebuild command it records."""
    from pipeline.compute import pin_threads
    from pipeline.io import atomic_write_json, write_manifest

    pin_threads(threads)
    dicts, corpus_ds = corpus_for(pcfg, preset, seed)
    metrics = pretrain_small_model(pcfg, corpus_ds, dicts, out, seed=seed, device=device, progress=progress)
    rec = recipe(pcfg, preset, seed)
    atomic_write_json(
        Path(out) / RECIPE_FILE,
        {
            "key": recipe_key(rec),
            "recipe": rec,
            "threads": int(threads),
            "command": f"gfattn pretrain --embedded --preset {config_preset} --seed {seed} --out DIR",
        },
    )
    write_manifest(out)
    return metrics


def rebuilt_differences(built: Path, reference: Path = SHIPPED_DIR) -> list[str]:
    """The files whose sha256 differs between two model folders, or that only one holds (empty: identical):
    weights, config, dictionaries and recipe; the metrics JSON and the manifest are left out."""
    from pipeline.io import MANIFEST, folder_files

    skip = {METRICS_FILE, MANIFEST}
    a = {k: v["sha256"] for k, v in folder_files(built).items() if k not in skip}
    b = {k: v["sha256"] for k, v in folder_files(reference).items() if k not in skip}
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
