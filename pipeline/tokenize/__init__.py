"""Rank-value encoding exactly as Geneformer does it, and the tokenized cells as training and
analysis read them (length-grouped batches)."""
