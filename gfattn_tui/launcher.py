"""Starting `gfattn pipeline` from the TUI, detached.

The run gets its own session (`start_new_session=True`) and writes stdout/stderr to a log file next to
the store (`.gfattn-cache/logs/<time>.log`), so closing the TUI or losing the SSH connection does not
stop it; the TUI only follows it through the store. The interpreter is the TUI's own
(`sys.executable -m pipeline`), so the run uses the same installation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.paths import cache_dir_for_store

FALLBACK_PRESETS: dict[str, str] = {
    "default": "embedded demo: synthetic data and a small pretrained model",
    "quick": "a tiny end-to-end run for smoke tests, under a minute",
    "thesis-synthetic": "the thesis's scale on synthetic data",
    "sciplex2-nutlin": "the thesis design on real sci-Plex 2 data and a real Geneformer checkpoint",
}

DEVICES = ("auto", "cpu", "cuda")


def available_presets() -> dict[str, str]:
    """Preset name -> description from `pipeline.config.PRESETS` (stdlib-only module), else a static list."""
    try:
        from pipeline.config import PRESETS
    except Exception:  # the pipeline package may be older than the TUI
        return dict(FALLBACK_PRESETS)
    return {str(k): str(v) for k, v in PRESETS.items()} or dict(FALLBACK_PRESETS)


@dataclass
class RunRequest:
    """What the New run form collects; `argv()` turns it into `gfattn pipeline` flags."""

    preset: str = "default"
    data: str = ""
    tokenized: str = ""
    model: str = ""
    geneformer_dir: str = ""
    config: str = ""
    name: str = ""
    device: str = "auto"
    nproc: int | None = None
    epochs: int | None = None
    label_column: str = ""
    classes: list[str] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)  # `COL=V1,V2`, one per `--filter`
    config_text: str = ""  # a config the form generated: written to `config` when the run starts
    extra: list[str] = field(default_factory=list)

    def validate(self) -> list[str]:
        """Problems the user can fix in the form, one line each (empty when the request is fine)."""
        problems = []
        if self.data:
            p = Path(self.data).expanduser()
            if not p.is_file():
                problems.append(f"data file {p} does not exist")
            elif p.suffix not in (".h5ad", ".loom"):
                problems.append(f"data file {p} is neither .h5ad nor .loom")
        if self.tokenized:
            if not Path(self.tokenized).expanduser().is_dir():
                problems.append(f"tokenized dataset {self.tokenized} does not exist")
            if self.data:
                problems.append("data file and tokenized dataset both given; pass one")
            if not self.model:
                problems.append("a tokenized dataset needs the model dir whose dictionaries tokenized it")
        if self.model and not Path(self.model).expanduser().is_dir():
            problems.append(f"model directory {self.model} does not exist")
        if self.geneformer_dir and not Path(self.geneformer_dir).expanduser().is_dir():
            problems.append(f"Geneformer directory {self.geneformer_dir} does not exist")
        if self.config and not self.config_text and not Path(self.config).expanduser().is_file():
            problems.append(f"config file {self.config} does not exist")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {', '.join(DEVICES)}")
        if self.nproc is not None and self.nproc < 1:
            problems.append("processes must be at least 1")
        if self.epochs is not None and self.epochs < 1:
            problems.append("epochs must be at least 1")
        if self.classes and not self.label_column:
            problems.append("classes need a label column")
        if self.classes and len(self.classes) < 2:
            problems.append("pick at least two classes")
        return problems

    def argv(self, store_path: str | Path) -> list[str]:
        args = [sys.executable, "-m", "pipeline", "pipeline", "--store", str(store_path)]
        args += ["--preset", self.preset]
        for flag, value in (
            ("--data", self.data),
            ("--tokenized", self.tokenized),
            ("--model", self.model),
            ("--geneformer-dir", self.geneformer_dir),
            ("--config", self.config),
            ("--name", self.name),
        ):
            if value:
                args += [flag, str(Path(value).expanduser()) if flag != "--name" else value]
        if self.label_column:
            args += ["--label-column", self.label_column]
        if self.classes:
            args += ["--classes", ",".join(self.classes)]
        for item in self.filters:
            args += ["--filter", item]
        if self.device and self.device != "auto":
            args += ["--device", self.device]
        if self.nproc is not None:
            args += ["--nproc", str(self.nproc)]
        if self.epochs is not None:
            args += ["--epochs", str(self.epochs)]
        return args + list(self.extra)


@dataclass
class LaunchedRun:
    process: subprocess.Popen
    argv: list[str]
    log_path: Path
    started: float
    what: str = "run"  # "run", "resume of run 7", "export of run 7", ...
    out_dir: Path | None = None
    form: dict | None = None  # the New run form that started it (`NewRunScreen.form_state`), to reopen

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """Exit status once the process ended (reaping it), else None."""
        return self.process.poll()

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def last_line(self) -> str:
        """The log's last non-empty line: what a failed process said last (its error)."""
        for line in reversed(self.log_tail(20).splitlines()):
            if line.strip():
                return line.strip()
        return ""


def log_dir_for_store(store_path: str | Path) -> Path:
    return cache_dir_for_store(store_path) / "logs"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def writable_log_dir(store_path: str | Path, *, read_only: bool = False) -> Path:
    """Where a launched process's log goes: beside the store (`.gfattn-cache/logs`) when it can be
    written there, else under the current folder, else the temporary folder (a read-only store)."""
    candidates = [] if read_only else [log_dir_for_store(store_path)]
    candidates += [Path.cwd() / ".gfattn-cache" / "logs", Path(tempfile.gettempdir()) / "gfattn-logs"]
    for folder in candidates:
        if _writable(folder):
            return folder
    return candidates[-1]


def start_pipeline(
    request: RunRequest, store_path: str | Path, *, cwd: str | Path | None = None, log_dir: Path | None = None
) -> LaunchedRun:
    """Start the run in its own session with output to a log file (first writing the config the form
    generated, when there is one); returns at once."""
    store_path = Path(store_path).expanduser().resolve()
    if request.config_text and request.config:
        config = Path(request.config).expanduser()
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(request.config_text, encoding="utf-8")
    return _start(request.argv(store_path), store_path, cwd=cwd, what="run", log_dir=log_dir)


def resume_argv(run_id: int, store_path: str | Path) -> list[str]:
    """`gfattn pipeline --resume RUN --store PATH`."""
    return [sys.executable, "-m", "pipeline", "pipeline", "--resume", str(int(run_id)), "--store", str(store_path)]


def export_argv(run_id: int, store_path: str | Path, fmt: str, out_dir: str | Path) -> list[str]:
    """`gfattn export RUN --format csv|parquet|json --out DIR --store PATH`."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}")
    return [
        *(sys.executable, "-m", "pipeline", "export", str(int(run_id))),
        *("--format", fmt, "--out", str(out_dir), "--store", str(store_path)),
    ]


def plot_argv(run_id: int, store_path: str | Path, out_dir: str | Path) -> list[str]:
    """`gfattn plot RUN --out DIR --store PATH`."""
    return [
        sys.executable,
        "-m",
        "pipeline",
        "plot",
        str(int(run_id)),
        "--out",
        str(out_dir),
        "--store",
        str(store_path),
    ]


EXPORT_FORMATS = ("csv", "parquet", "json")


def default_out_dir(store_path: str | Path, run_id: int, what: str) -> Path:
    """`./gfattn-<what>/run-<id>` under the current folder: where the user can write (a store may be
    read-only, or shared) and where a researcher looks for it."""
    return Path.cwd() / f"gfattn-{what}" / f"run-{int(run_id)}"


def start_resume(run_id: int, store_path: str | Path, *, log_dir: Path | None = None) -> LaunchedRun:
    store_path = Path(store_path).expanduser().resolve()
    return _start(resume_argv(run_id, store_path), store_path, what=f"resume of run {run_id}", log_dir=log_dir)


def start_export(
    run_id: int, store_path: str | Path, fmt: str, out_dir: str | Path, *, log_dir: Path | None = None
) -> LaunchedRun:
    store_path = Path(store_path).expanduser().resolve()
    out = Path(out_dir).expanduser()
    argv = export_argv(run_id, store_path, fmt, out)
    launched = _start(argv, store_path, what=f"export of run {run_id}", log_dir=log_dir)
    launched.out_dir = out
    return launched


def start_plot(run_id: int, store_path: str | Path, out_dir: str | Path, *, log_dir: Path | None = None) -> LaunchedRun:
    store_path = Path(store_path).expanduser().resolve()
    out = Path(out_dir).expanduser()
    launched = _start(plot_argv(run_id, store_path, out), store_path, what=f"figures of run {run_id}", log_dir=log_dir)
    launched.out_dir = out
    return launched


def _start(
    argv: list[str], store_path: Path, *, cwd: str | Path | None = None, what: str, log_dir: Path | None = None
) -> LaunchedRun:
    """Start `argv` detached (own session), output to a log file (next to the store unless `log_dir`
    says otherwise); returns at once."""
    logs = log_dir or log_dir_for_store(store_path)
    logs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = logs / f"{stamp}-{os.getpid()}.log"
    n = 1
    while log_path.exists():
        n += 1
        log_path = logs / f"{stamp}-{os.getpid()}-{n}.log"
    env = dict(os.environ)
    # The launched run must find this checkout's packages even when started from another directory.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "ab", buffering=0) as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(cwd) if cwd else None,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    return LaunchedRun(process=process, argv=argv, log_path=log_path, started=time.time(), what=what)
