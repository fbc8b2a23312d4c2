"""Settings of `gfattn-tui`: a TOML file plus environment variables (posting's layering).

Lookup: `$GFATTN_TUI_CONFIG`, else `~/.config/gfattn/tui.toml` (under `$XDG_CONFIG_HOME` when set).
Environment variables override the file. Example file::

    theme = "textual-dark"          # theme at start
    light_theme = "textual-light"   # the other side of the theme toggle
    dark_theme = "textual-dark"
    poll_interval = 0.5             # seconds between store change checks
    page_size = 100                 # rows per page of the gene table
    utc = false                     # show timestamps in UTC instead of local time
    log_lines = 500                 # lines kept in the run log view

    [keymap]                        # binding id = key(s), see the footer / command palette
    "runs.delete" = "x"
    "app.toggle_theme" = "f9"
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "GFATTN_TUI_CONFIG"
ENV_PREFIX = "GFATTN_TUI_"


class ConfigError(ValueError):
    """A settings file or variable that cannot be used; the message names it and the fix."""


@dataclass
class TuiConfig:
    theme: str = "textual-dark"
    dark_theme: str = "textual-dark"
    light_theme: str = "textual-light"
    poll_interval: float = 0.5
    page_size: int = 100
    utc: bool = False
    log_lines: int = 500
    keymap: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> TuiConfig:
        environ = os.environ if environ is None else environ
        cfg = cls()
        file = Path(path) if path else default_config_path(environ)
        if file is not None and file.is_file():
            try:
                data = tomllib.loads(file.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{file}: not valid TOML ({exc}); fix or remove the file") from exc
            cfg._apply(data, str(file))
            cfg.source = str(file)
        elif path or environ.get(CONFIG_ENV):
            raise ConfigError(f"{file}: no such settings file; check ${CONFIG_ENV}")
        env = {}
        for f in fields(cls):
            if f.name in ("keymap", "source"):
                continue
            key = ENV_PREFIX + f.name.upper()
            if key in environ:
                env[f.name] = environ[key]
        cfg._apply(env, "environment")
        return cfg

    def _apply(self, data: Mapping[str, Any], where: str) -> None:
        known = {f.name: f for f in fields(self) if f.name != "source"}
        for key, value in data.items():
            if key not in known:
                import difflib

                near = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigError(f"{where}: unknown setting {key!r}{hint}")
            current = getattr(self, key)
            try:
                if key == "keymap":
                    if not isinstance(value, Mapping):
                        raise TypeError("a table of binding id = key")
                    value = {str(k): str(v) for k, v in value.items()}
                    value = {**self.keymap, **value}
                elif isinstance(current, bool):
                    value = _as_bool(value)
                elif isinstance(current, int):
                    value = int(value)
                elif isinstance(current, float):
                    value = float(value)
                else:
                    value = str(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: setting {key!r} = {value!r} is not a {type(current).__name__}") from exc
            setattr(self, key, value)
        if self.poll_interval <= 0:
            raise ConfigError(f"{where}: poll_interval must be positive")
        if self.page_size < 10:
            raise ConfigError(f"{where}: page_size must be at least 10")


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


def default_config_path(environ: Mapping[str, str] | None = None) -> Path | None:
    environ = os.environ if environ is None else environ
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]).expanduser()
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "gfattn" / "tui.toml"
