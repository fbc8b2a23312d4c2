"""Models: loading checkpoints for each use, pretraining gfattn's small BERT, the shipped embedded
model, and the checkpoint sanity check."""
