"""Fine-tuning in frozen / unfrozen / last-k modes, and the bag-of-genes baseline beside it."""
