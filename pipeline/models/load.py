"""Geneformer checkpoints and gfattn's own small BERTs (thesis sections 2.3 and 3.1; Theodoris et al. 2023).

A model directory is a plain Hugging Face directory: `config.json` plus `model.safetensors` or
`pytorch_model.bin` (read with `weights_only=True`), optionally carrying Geneformer's token and median
dictionaries. Loading never reaches the Hub. A masked-LM checkpoint (Geneformer's published models, or
what `gfattn pretrain` writes) becomes a `BertForSequenceClassification` with a new classification head;
a fine-tuned classifier is reused as it is.

Before a model meets data its input space is checked: the vocabulary size must equal the token
dictionary's size (a V1 model given V2 tokens would silently read the wrong genes) and the tokenized
cells must fit the model's position embeddings (V1: 2,048; V2: 4,096).

Training modes (thesis sections 2.3 and 4.1) decide which parameters train:

- `frozen`: the linear probe. Embeddings and every encoder layer are frozen; the classification head
  trains. The head is `bert.pooler` + `classifier`: a masked-LM checkpoint has no pooler, so the pooler is
  as new as the classifier and training it is part of probing the frozen encoder.
- `unfrozen`: everything trains.
- `last-K`: embeddings and the first L-K encoder layers frozen; the last K layers and the head train
  (the thesis's "first five layers frozen" of a 6-layer model is `last-1`).
- `freeze-N`: Geneformer's `freeze_layers=N`, exactly as its `Classifier` does it: the first N encoder
  layers are frozen and nothing else, so the embeddings, the remaining layers and the head train.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import parse_mode  # the one parser of training modes
from pipeline.errors import InputError

CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CLASSIFIER_ARCHITECTURES = ("BertForSequenceClassification",)
MASKED_LM_ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining")


# --------------------------------------------------------------------------------------------- files
def _offline() -> None:
    # A local directory never needs the Hub; make sure nothing tries.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextmanager
def _quiet_transformers():
    """Silence the load report and progress bars; gfattn reports what matters itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def weight_file(model_dir: str | os.PathLike) -> Path | None:
    """The weights file of a model directory (safetensors preferred), or None."""
    model_dir = Path(model_dir)
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """The checks of a local model directory, in the words every caller uses (the pipeline's preflight, the
    TUI's New run form): a folder with a BERT `config.json` and its weights. Light: reads JSON only."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise InputError(f"model directory {model_dir} does not exist; pass a local Hugging Face model directory")
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{model_dir} has no {CONFIG_FILE}; a model directory needs config.json and its weights")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{config_path} is not valid JSON: {exc}") from None
    if raw.get("model_type", "bert") != "bert":
        raise InputError(
            f"{config_path}: model_type is {raw.get('model_type')!r}; gfattn needs a BERT (Geneformer) model"
        )
    if weight_file(model_dir) is None:
        raise InputError(
            f"{model_dir} has {CONFIG_FILE} but no weights ({', '.join(WEIGHT_FILES[::2])}); "
            "copy the checkpoint's weights next to its config"
        )
    return model_dir


def read_model_config(model_dir: str | os.PathLike):
    """The `BertConfig` of a local model directory, after checking the directory is a usable checkpoint."""
    _offline()
    from transformers import BertConfig

    model_dir = check_model_dir(model_dir)
    return BertConfig.from_pretrained(str(model_dir), local_files_only=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _weight_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of one weights file, opened the cheap way: a safetensors header is parsed (no
    tensor is read); a torch pickle is loaded with `weights_only=True`, memory-mapped where it can be."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                return {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except Exception as exc:  # SafetensorError, OSError: a damaged or truncated file
            raise InputError(f"weights file {path} cannot be read: {_first_line(exc)}") from None
    import torch

    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # only the legacy (non-zip) format cannot be memory-mapped
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (not weights only), RuntimeError (truncated), EOFError, ...
        raise InputError(
            f"weights file {path} cannot be loaded with weights_only=True: {_first_line(exc)}; "
            "save the model again (model.save_pretrained) or convert it to safetensors"
        ) from None
    if not isinstance(state, dict):
        raise InputError(f"weights file {path} holds no state dict (a {type(state).__name__})")
    return {k: list(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def check_checkpoint(model_dir: str | os.PathLike, config=None) -> None:
    """Open a checkpoint's weights before anything is recorded: the folder's own `gfattn_manifest.json`
    verified where it has one, every weights file opened (`_weight_shapes`), and its tensors listed
    against `config.json` (the word embeddings' vocabulary and hidden size, one encoder layer per
    `num_hidden_layers`). A damaged, truncated, foreign or mismatched file is one line naming it."""
    import re

    from pipeline.io import MANIFEST, verify_manifest

    model_dir = Path(model_dir).expanduser()
    config = config if config is not None else read_model_config(model_dir)
    if (model_dir / MANIFEST).is_file():
        verify_manifest(
            model_dir,
            what="model folder",
            fix=f"restore the files it records, or delete {MANIFEST} there to use the folder as it is",
        )
    first = weight_file(model_dir)
    files = [first]
    if first is not None and first.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(first.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            raise InputError(f"weights index {first} is not a valid index (weight_map)") from None
        files = [model_dir / shard for shard in shards]
        for f in files:
            if not f.is_file():
                raise InputError(f"weights index {first} names {f.name}, which is missing")
    shapes: dict[str, list[int]] = {}
    for f in files:
        shapes.update(_weight_shapes(f))
    where = files[0] if len(files) == 1 else first
    words = [k for k in shapes if k.endswith("embeddings.word_embeddings.weight")]
    if not words:
        raise InputError(f"weights file {where} has no BERT word embeddings; is it a Geneformer (BERT) checkpoint?")
    expected = [int(config.vocab_size), int(config.hidden_size)]
    if shapes[words[0]] != expected:
        raise InputError(
            f"weights file {where}: word embeddings of shape {shapes[words[0]]}, but {model_dir / CONFIG_FILE} "
            f"says vocab_size x hidden_size = {expected}; the weights belong to another model"
        )
    layers = {int(m.group(1)) for k in shapes if (m := re.search(r"encoder\.layer\.(\d+)\.", k))}
    if layers != set(range(int(config.num_hidden_layers))):
        raise InputError(
            f"weights file {where} holds {len(layers)} encoder layers but {model_dir / CONFIG_FILE} says "
            f"num_hidden_layers = {config.num_hidden_layers}; the weights belong to another model"
        )


def is_classifier_config(config) -> bool:
    return any(a in CLASSIFIER_ARCHITECTURES for a in (getattr(config, "architectures", None) or []))


def model_dictionaries(model_dir: str | os.PathLike):
    """The gene dictionaries a model directory carries (`GeneDictionaries`), or None when it carries none."""
    model_dir = Path(model_dir)
    if not any(model_dir.glob("token_dictionary*.pkl")):
        return None
    from pipeline.data.dictionaries import GeneDictionaries

    return GeneDictionaries.from_model_dir(model_dir)


def _dictionary_source(dicts) -> str:
    for attr in ("source", "token_dictionary_path", "path", "token_dictionary_file"):
        value = getattr(dicts, attr, None)
        if value:
            return str(value)
    return "the token dictionary"


# -------------------------------------------------------------------------------------------- checks
def check_model_inputs(
    config,
    *,
    dicts=None,
    max_len: int | None = None,
    model_dir: str | os.PathLike | None = None,
    data_source: str | None = None,
) -> None:
    """Refuse a model whose vocabulary or input size does not match the dictionary or the tokenization.

    `max_len` is the longest tokenized cell (or the tokenization's truncation length) that will be fed.
    """
    where = f"{Path(model_dir) / CONFIG_FILE}" if model_dir is not None else "the model config"
    if dicts is not None:
        n_tokens = len(dicts.token_dict)
        source = _dictionary_source(dicts)
        if int(config.vocab_size) != n_tokens:
            raise InputError(
                f"vocabulary mismatch: {where} has vocab_size {config.vocab_size} but {source} has {n_tokens} "
                "tokens; tokenize with the dictionaries the model was trained with (V1 models: gc30M, V2: gc104M)"
            )
        top = max(int(v) for v in dicts.token_dict.values()) if n_tokens else -1
        if top >= int(config.vocab_size):
            raise InputError(
                f"vocabulary mismatch: {source} uses token id {top} but {where} has only vocab_size "
                f"{config.vocab_size}; use the model's own token dictionary"
            )
    if max_len is not None:
        positions = int(config.max_position_embeddings)
        if int(max_len) > positions:
            data = data_source or "the tokenized cells"
            raise InputError(
                f"input size mismatch: {data} have up to {int(max_len)} tokens but {where} has "
                f"max_position_embeddings {positions}; re-tokenize with --max-len {positions} or less"
            )


# ------------------------------------------------------------------------------------------- loading
def load_classifier(
    model_dir: str | os.PathLike,
    num_labels: int,
    *,
    dicts=None,
    attn_implementation: str = "sdpa",
    max_len: int | None = None,
    data_source: str | None = None,
    seed: int | None = None,
):
    """A `BertForSequenceClassification` from a local Geneformer/gfattn checkpoint, ready to fine-tune.

    A masked-LM checkpoint gets a new, randomly initialised head (`bert.pooler` and `classifier`) drawn
    from torch's RNG: with `seed`, every generator is seeded right before (`pipeline.compute`), so the head
    is the same in every process whatever ran before it; without, the caller's RNG state decides. A fine-tuned classifier keeps its head
    when its number of labels equals `num_labels`; otherwise its classifier layer is re-initialised for
    the new labels (with a warning), because continuing from a fine-tuned encoder on a new task is
    legitimate while its old head is meaningless for the new labels.

    `dicts` (a `GeneDictionaries`) defaults to the dictionaries the model directory carries; when given
    or found, the vocabulary size must match. `max_len` (the longest tokenized cell) must fit the position
    embeddings. Mismatches raise `InputError` naming both numbers.
    """
    if int(num_labels) < 2:
        raise InputError(f"a classifier needs at least 2 labels, got {num_labels}")
    import torch
    from transformers import BertForSequenceClassification

    model_dir = Path(model_dir).expanduser()
    config = read_model_config(model_dir)
    if dicts is None:
        dicts = model_dictionaries(model_dir)
    check_model_inputs(config, dicts=dicts, max_len=max_len, model_dir=model_dir, data_source=data_source)

    reinit_head = False
    if is_classifier_config(config) and int(config.num_labels) != int(num_labels):
        warnings.warn(
            f"{model_dir} is a classifier with {config.num_labels} labels; its classifier layer is "
            f"re-initialised for {num_labels} labels (the encoder and pooler are kept)",
            stacklevel=2,
        )
        reinit_head = True
    kwargs: dict[str, Any] = {}
    if reinit_head or not is_classifier_config(config):
        # id2label of an old head would disagree with the new number of labels.
        kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(int(num_labels))}
        kwargs["label2id"] = {f"LABEL_{i}": i for i in range(int(num_labels))}
    if seed is not None:
        from pipeline.compute import seed_everything

        seed_everything(seed)
    with _quiet_transformers():
        model = BertForSequenceClassification.from_pretrained(
            str(model_dir),
            num_labels=int(num_labels),
            attn_implementation=attn_implementation,
            local_files_only=True,
            weights_only=True,
            dtype=torch.float32,
            ignore_mismatched_sizes=reinit_head,
            **kwargs,
        )
    model.config.problem_type = "single_label_classification"
    return model


def load_for_attention(
    model_dir: str | os.PathLike,
    *,
    dicts=None,
    max_len: int | None = None,
    data_source: str | None = None,
):
    """A model for attention analysis: eager attention (weights are computed), eval mode, float32.

    The class follows the checkpoint's architecture: a fine-tuned classifier loads as
    `BertForSequenceClassification`, a masked-LM checkpoint as `BertForMaskedLM`; either way the encoder
    is `model.bert`.
    """
    import torch
    from transformers import BertForMaskedLM, BertForSequenceClassification, BertModel

    model_dir = Path(model_dir).expanduser()
    config = read_model_config(model_dir)
    if dicts is None:
        dicts = model_dictionaries(model_dir)
    check_model_inputs(config, dicts=dicts, max_len=max_len, model_dir=model_dir, data_source=data_source)
    archs = getattr(config, "architectures", None) or []
    if is_classifier_config(config):
        cls = BertForSequenceClassification
    elif any(a in MASKED_LM_ARCHITECTURES for a in archs):
        cls = BertForMaskedLM
    else:
        cls = BertModel
    with _quiet_transformers():
        model = cls.from_pretrained(
            str(model_dir),
            attn_implementation="eager",
            local_files_only=True,
            weights_only=True,
            dtype=torch.float32,
        )
    model.eval()
    return model


def build_small_bert(
    vocab_size: int,
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    intermediate: int = 256,
    max_len: int = 256,
    dropout: float = 0.02,
    pad_token_id: int = 0,
    attn_implementation: str = "sdpa",
    seed: int | None = None,
):
    """A Geneformer-style `BertForMaskedLM` with random weights: ReLU, dropout 0.02, pad id 0, absolute
    positions, as in Geneformer's V1 configs, only smaller."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    if hidden % heads:
        raise InputError(f"hidden size {hidden} is not divisible by the number of heads {heads}")
    for name, value in (
        ("vocab_size", vocab_size),
        ("layers", layers),
        ("hidden", hidden),
        ("heads", heads),
        ("intermediate", intermediate),
        ("max_len", max_len),
    ):
        if int(value) < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    config = BertConfig(
        vocab_size=int(vocab_size),
        hidden_size=int(hidden),
        num_hidden_layers=int(layers),
        num_attention_heads=int(heads),
        intermediate_size=int(intermediate),
        hidden_act="relu",
        hidden_dropout_prob=float(dropout),
        attention_probs_dropout_prob=float(dropout),
        max_position_embeddings=int(max_len),
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=int(pad_token_id),
        position_embedding_type="absolute",
        architectures=["BertForMaskedLM"],
    )
    config._attn_implementation = attn_implementation
    if seed is not None:
        torch.manual_seed(int(seed))
    return BertForMaskedLM(config)


# ------------------------------------------------------------------------------------ training modes
def apply_training_mode(model, mode: str) -> list[str]:
    """Set `requires_grad` for a training mode (see the module docstring); returns the trainable names."""
    num_layers = len(model.bert.encoder.layer)
    kind, k = parse_mode(mode, num_layers)
    for p in model.parameters():
        p.requires_grad_(True)
    frozen_modules = []
    if kind == "frozen":
        frozen_modules = [model.bert.embeddings, model.bert.encoder]
    elif kind == "last":
        frozen_modules = [model.bert.embeddings, *model.bert.encoder.layer[: num_layers - k]]
    elif kind == "freeze":
        frozen_modules = list(model.bert.encoder.layer[:k])
    for module in frozen_modules:
        for p in module.parameters():
            p.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]
