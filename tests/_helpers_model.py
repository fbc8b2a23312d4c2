"""Small models, dictionaries and rank-value encoded cells for the model, training and pretraining tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def toy_dictionaries(n_genes: int = 200):
    """V1-style dictionaries (<pad>=0, <mask>=1, then genes) over made-up Ensembl IDs."""
    from pipeline.data.dictionaries import GeneDictionaries

    tokens = {"<pad>": 0, "<mask>": 1}
    tokens.update({f"ENSG{i:011d}": i + 2 for i in range(n_genes)})
    medians = {k: 1.0 for k in tokens if not k.startswith("<")}
    return GeneDictionaries(tokens, medians, version="V1", source="toy token dictionary")


def class_coded_cells(
    n: int,
    *,
    vocab_size: int = 202,
    n_classes: int = 2,
    length=(12, 40),
    seed: int = 0,
    marker_genes: int = 4,
    first_token: int = 2,
):
    """Rank-value-like cells whose class decides which genes sit at the top ranks.

    Each class owns `marker_genes` genes; a cell puts three of its class's markers first, then random
    other genes. Returns a dict of columns (`input_ids`, `length`, `label`, `cell_id`).
    """
    rng = np.random.default_rng(seed)
    genes = np.arange(first_token, vocab_size)
    markers = [genes[c * marker_genes : (c + 1) * marker_genes] for c in range(n_classes)]
    background = genes[n_classes * marker_genes :]
    ids, labels, lengths = [], [], []
    for _ in range(n):
        y = int(rng.integers(n_classes))
        size = int(rng.integers(length[0], length[1] + 1))
        top = rng.choice(markers[y], size=min(3, marker_genes), replace=False)
        rest = rng.choice(background, size=size - len(top), replace=False)
        seq = np.concatenate([top, rest]).astype(int)
        ids.append(seq.tolist())
        labels.append(y)
        lengths.append(len(seq))
    return {"input_ids": ids, "length": lengths, "label": labels, "cell_id": [f"c{i}" for i in range(n)]}


def corpus_cells(
    n: int, *, n_genes: int = 120, n_types: int = 4, length=(24, 48), seed: int = 0, offset: int = 2, noise: float = 0.7
):
    """A pretraining corpus with structure to learn: each cell type over-expresses its own program of genes,
    so a cell's other genes tell which program its masked genes come from."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.0, n_genes)
    programs = [rng.choice(n_genes, n_genes // (2 * n_types), replace=False) for _ in range(n_types)]
    out = []
    for _ in range(n):
        t = int(rng.integers(n_types))
        expr = base + rng.normal(0.0, noise, n_genes)
        expr[programs[t]] += 3.0
        size = int(rng.integers(length[0], length[1] + 1))
        out.append((np.argsort(-expr)[:size] + offset).tolist())
    return {"input_ids": out, "length": [len(x) for x in out]}


def save_tiny_model(
    path,
    vocab_size: int = 202,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int = 64,
    max_len: int = 64,
    dropout: float = 0.02,
    seed: int = 0,
):
    from pipeline.models.load import build_small_bert

    model = build_small_bert(
        vocab_size,
        layers=layers,
        hidden=hidden,
        heads=heads,
        intermediate=intermediate,
        max_len=max_len,
        dropout=dropout,
        seed=seed,
    )
    model.save_pretrained(str(path))
    return path


def save_tiny_classifier(path, dicts, *, seed: int = 0, **config):
    """A 2-layer, 16-wide `BertForSequenceClassification` over `dicts`, saved as `gfattn finetune` saves one
    (weights, dictionaries, gfattn_finetune.json with the weights' sha256); `config` overrides BertConfig."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.training.finetune import save_finetuned

    cfg = BertConfig(
        **{
            "vocab_size": dicts.vocab_size,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 64,
            "num_labels": 2,
            **config,
        }
    )
    torch.manual_seed(seed)
    save_finetuned(BertForSequenceClassification(cfg), path, dicts=dicts, summary={"mode": "test"})
    return path


def save_random_geneformer(config_dir, path, seed: int = 0):
    """A Geneformer masked-LM checkpoint with the real config and random weights."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig.from_pretrained(str(config_dir), local_files_only=True)
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    model.save_pretrained(str(path))
    return model


def save_geneformer_checkpoint(config_file, path, *, seed: int = 0, **overrides) -> dict:
    """A checkpoint directory as Geneformer ships one: a real config (with `overrides`, e.g. fewer layers),
    random masked-LM weights as `pytorch_model.bin`, no dictionaries. Returns the config."""
    import json

    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = json.loads(Path(config_file).read_text())
    config.update(overrides)
    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(**config))
    Path(path).mkdir(parents=True)
    model.config.to_json_file(Path(path) / "config.json")
    torch.save(model.state_dict(), Path(path) / "pytorch_model.bin")
    return config


class FakeStore:
    """Stands in for `store.Store`: keeps the calls pretraining and fine-tuning's store recorder
    (`pipeline.run.stages.finetune.FinetuneStoreRecorder`) make."""

    def __init__(self):
        self.progress, self.metrics, self.confusions, self.events, self.json = [], [], [], [], {}

    def set_progress(self, run_id, stage, done, total=None, *, unit="", throughput=None, eta_s=None):
        self.progress.append(
            dict(run_id=run_id, stage=stage, done=done, total=total, unit=unit, throughput=throughput, eta_s=eta_s)
        )

    def log_metrics(self, run_id, rows):
        self.metrics.extend(dict(r, run_id=run_id) for r in rows)

    def put_confusion(self, run_id, labels, matrix, *, split="test"):
        self.confusions.append(dict(run_id=run_id, labels=list(labels), matrix=np.asarray(matrix), split=split))

    def log_event(self, run_id, message, *, stage=None, level="info"):
        self.events.append(message)

    def put_json(self, run_id, name, obj):
        self.json[name] = obj

    def rows(self, name, split):
        return [r for r in self.metrics if r["name"] == name and r["split"] == split]


def parameters(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
