"""The headless core never imports the UI, the store never imports torch, and `gfattn --help` is light."""

import json
import subprocess
import sys

import pytest

PROBE = """
import importlib, json, sys
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in
      ('textual', 'textual_plotext', 'torch', 'transformers', 'scanpy', 'anndata', 'datasets'))))
"""


def _loaded(modules):
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(modules=modules)], capture_output=True, text=True, check=True
    )
    return {m.split(".")[0] for m in json.loads(out.stdout)}


def _package_modules(package):
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    return [package] + [f"{package}.{m.name}" for m in pkgutil.walk_packages(pkg.__path__) if m.name != "__main__"]


@pytest.mark.parametrize("package", ["pipeline", "store"])
def test_headless_packages_never_import_textual(package):
    loaded = _loaded(_package_modules(package))
    assert "textual" not in loaded and "textual_plotext" not in loaded


def test_store_never_imports_torch():
    loaded = _loaded(_package_modules("store"))
    assert not loaded & {"torch", "transformers", "textual"}


def test_cli_entry_and_command_modules_are_light():
    from pipeline.cli import COMMANDS

    modules = ["pipeline.cli"] + [module for module, _ in COMMANDS.values()]
    loaded = _loaded(modules)
    assert not loaded & {"torch", "transformers", "scanpy", "anndata", "datasets", "textual"}


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    from pipeline.cli import COMMANDS

    for name in COMMANDS:
        assert f"  {name} " in out.stdout


def test_unknown_command_exits_2_with_suggestion():
    out = subprocess.run([sys.executable, "-m", "pipeline", "pipline"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "did you mean `pipeline`" in out.stderr
