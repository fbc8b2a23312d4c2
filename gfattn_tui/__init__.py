"""`gfattn-tui`: launch pipeline runs, watch them live and browse every result of the experiment store.

The app reads only the store (`store.Store`) and starts `gfattn pipeline` as a detached subprocess; it
never imports torch or scanpy. Layout follows harlequin and posting: one widget or screen per module,
a global `app.tcss`, blocking store calls in thread workers that post messages, bindings with ids that
a TOML keymap can remap, and a command-palette entry for every binding.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
