"""The synthetic data and corpus are identical across processes (the embedded model's cache relies on it)."""

import subprocess
import sys

CODE = """
import hashlib
from pipeline.data.synth import make_corpus, make_sciplex_like
a = make_corpus(n_cells=150, seed=3, preset="thesis")
b = make_sciplex_like(scale=0.02, preset="thesis", seed=3)
print(hashlib.sha256(a.X.data.tobytes() + b.X.data.tobytes()).hexdigest())
"""


def test_same_seed_same_counts_in_another_process():
    digests = {
        subprocess.run(
            [sys.executable, "-c", CODE],
            capture_output=True,
            text=True,
            check=True,
            env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)},
        ).stdout.strip()
        for seed in (1, 2)
    }
    assert len(digests) == 1
