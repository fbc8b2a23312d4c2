"""`gfattn synth`: writes a readable .h5ad atomically and reports a summary."""

from __future__ import annotations

import subprocess
import sys

from pipeline.cli import main


def test_cli_writes_sciplex_like(tmp_path, capsys):
    import anndata as ad

    from pipeline.data import synth

    out = tmp_path / "sub" / "data.h5ad"
    rc = main(
        ["synth", "--out", str(out), "--scale", "0.03", "--preset", "thesis", "--length-effect", "0.5", "--seed", "7"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "data.h5ad" in text and "median genes" in text and "12.5" in text
    a = ad.read_h5ad(out)
    truth = synth.ground_truth(a)
    assert truth["seed"] == 7 and truth["length_effect"] == 0.5 and truth["preset"] == "thesis"
    assert a.n_vars == 5000 and a.obs["dose_value"].nunique() == 8
    assert sorted(p.name for p in out.parent.iterdir()) == ["data.h5ad"]  # no temporary file left


def test_cli_writes_corpus(tmp_path, capsys):
    import anndata as ad

    out = tmp_path / "corpus.h5ad"
    assert (
        main(["synth", "--out", str(out), "--corpus", "--n-cells", "120", "--n-types", "4", "--preset", "thesis"]) == 0
    )
    assert "cell types" in capsys.readouterr().out
    c = ad.read_h5ad(out)
    assert c.n_obs == 120 and c.obs["cell_type"].nunique() == 4


def test_cli_input_errors(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x.h5ad"), "--n-cells", "10"]) == 2
    assert "--corpus" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "x.h5ad"), "--scale", "-1"]) == 2
    assert "--scale" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path), "--scale", "0.01"]) == 2
    assert "directory" in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists()


def test_cli_help_does_not_import_heavy_modules():
    code = (
        "import sys; from pipeline.cli import build_parser; build_parser('synth');"
        "heavy = [m for m in ('anndata', 'scipy', 'scanpy', 'torch', 'pandas') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
