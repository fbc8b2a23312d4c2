"""The `gfattn` command line.

Sub-commands live in `pipeline/commands/<name>.py`, each with `add_arguments(parser)` and
`run(args) -> int`. Only the module of the command being run is imported, and those modules import
torch, transformers and scanpy inside `run`, so `gfattn --help` answers instantly.

Exit statuses: 0 done, 1 a failed run (a traceback for bugs), 2 bad input (`InputError`) or an unusable
store (`store.StoreError` and subclasses: not SQLite, a newer schema, a directory, a missing folder, a
read-only store for a command that writes, a full disk; `sqlite3.DatabaseError`: damaged pages), each as
one line on stderr; 130 Ctrl-C; 141 when the reader of stdout went away (`gfattn runs --json | head -1`,
`gfattn --help | head -1`), quietly, as for a process killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipeline import __version__
from pipeline.errors import InputError

BROKEN_PIPE_EXIT = 128 + 13  # what a shell reports for a writer killed by SIGPIPE

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": (
        "pipeline.commands.pipeline",
        "run the thesis experiment end to end (default: embedded synthetic demo)",
    ),
    "inspect": ("pipeline.commands.inspect", "describe a data set before anything is trained: obs, genes, a command"),
    "synth": ("pipeline.commands.synth", "write a synthetic sci-Plex-like .h5ad (or a pretraining corpus)"),
    "tokenize": ("pipeline.commands.tokenize", "rank-value encode an .h5ad exactly as Geneformer does"),
    "pretrain": ("pipeline.commands.pretrain", "masked-gene pretraining of a small Geneformer-style BERT"),
    "finetune": (
        "pipeline.commands.finetune",
        "fine-tune a checkpoint on a tokenized dataset (frozen/unfrozen/last-k)",
    ),
    "analyze": ("pipeline.commands.analyze", "attention analysis comparing two fine-tuned models"),
    "compare": ("pipeline.commands.compare", "two pipeline runs side by side (e.g. variable vs fixed length)"),
    "plot": ("pipeline.commands.plot", "write the thesis figures of a run as PNG and SVG"),
    "runs": ("pipeline.commands.runs", "list runs in the store"),
    "show": ("pipeline.commands.show", "everything about one run"),
    "export": ("pipeline.commands.export", "export every table of a run (csv, parquet or json)"),
    "tag": ("pipeline.commands.tag", "add a tag to a run"),
    "note": ("pipeline.commands.note", "set a run's free-text note"),
    "rm": ("pipeline.commands.rm", "delete a run and everything it owns"),
}


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: gfattn [-h] [--version] COMMAND ...",
        "",
        "What does a fine-tuned Geneformer attend to? Fine-tune, analyse attention, record everything",
        "in a SQLite store (browse it with `gfattn-tui`).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `gfattn COMMAND --help` for a command's options."]
    return "\n".join(lines)


def build_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"gfattn {name}", description=help_)
    module.add_arguments(parser)
    return parser, module


def _is_store_error(exc: BaseException) -> bool:
    # `store` imports numpy, so it is not imported here: an exception can only be a StoreError if a
    # command has already imported the store package
    errors = sys.modules.get("store.errors")
    return errors is not None and isinstance(exc, errors.StoreError)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    import select

    if not hasattr(select, "poll"):  # cannot tell: a broken pipe at the top is almost always stdout
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor: not a closed pipe
        return False


def _stdout_gone() -> int:
    """stdout's reader closed the pipe: send further output (and the exit-time flush) to /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests)
        pass
    return BROKEN_PIPE_EXIT


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the top-level help, a command's --help or usage: the reader went away
        if not _stdout_closed():
            raise
        return _stdout_gone()


def _damaged_store(name: str, args, exc: BaseException) -> int:
    """A store SQLite cannot read (malformed pages, not a database) as one line naming it."""
    from pipeline.paths import resolve_store_path

    path = resolve_store_path(getattr(args, "store", None))
    print(
        f"gfattn {name}: error: store {path} is damaged ({exc}); `gfattn runs` and `gfattn show` may still read "
        f"what is intact; restore it from a copy, or recover it with `sqlite3 {path} .recover`",
        file=sys.stderr,
    )
    return 2


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"gfattn {__version__}")
        sys.stdout.flush()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else "; see `gfattn --help`"
        print(f"gfattn: error: unknown command {name!r}{hint}", file=sys.stderr)
        return 2
    parser, module = build_parser(name)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        sys.stdout.flush()  # `--help` into a closed pipe: BrokenPipeError here, answered by `main`
        raise
    # gfattn reports its own progress; library progress bars would interleave with it, and a run
    # never reaches for a model hub (users bring local checkpoints)
    for var in (
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_DATASETS_DISABLE_PROGRESS_BARS",
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
    ):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = int(module.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # some other pipe broke: a real failure
        return _stdout_gone()
    except InputError as exc:
        print(f"gfattn {name}: error: {exc}", file=sys.stderr)
        return InputError.exit_code
    except KeyboardInterrupt:
        print(f"gfattn {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        import sqlite3

        if type(exc) is sqlite3.DatabaseError:  # "database disk image is malformed", "file is not a database"
            return _damaged_store(name, args, exc)
        from pipeline.io import DiskFullError, is_disk_full

        if is_disk_full(exc):  # a command's own files (exports, figures, tokenizations): one line, exit 1
            why = (
                str(exc)
                if isinstance(exc, DiskFullError)
                else f"out of disk space ({exc}); free space and run it again"
            )
            print(f"gfattn {name}: error: {why}", file=sys.stderr)
            return 1
        if not _is_store_error(exc):
            raise
        print(f"gfattn {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
