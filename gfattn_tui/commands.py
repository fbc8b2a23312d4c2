"""Command palette: every binding active on the current screen is also a palette command.

Listing bindings (instead of a second, hand-kept list of commands) means a new binding is in the
palette the moment it exists, with the key shown beside it, remapped keys included.
"""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

# Textual's own palette already offers these.
_SKIP_ACTIONS = {"command_palette", "app.command_palette"}


class BindingCommands(Provider):
    """Palette entries for the bindings of the screen the palette was opened on."""

    def _commands(self) -> list[tuple[str, str, object]]:
        seen: set[tuple[int, str]] = set()
        commands = []
        for active in self.screen.active_bindings.values():
            binding = active.binding
            if binding.action in _SKIP_ACTIONS or binding.system or not binding.description or not active.enabled:
                continue
            if not binding.id and not binding.show:
                # widget internals such as a table's cursor keys
                continue
            marker = (id(active.node), binding.action)
            if marker in seen:
                continue
            seen.add(marker)
            display_key = self.app.get_key_display(binding)
            help_text = binding.tooltip or f"key: {display_key}"
            if binding.id:
                help_text += f"  ·  id: {binding.id}"
            commands.append((binding.description, help_text, partial(self.app.run_action, binding.action, active.node)))
        commands.sort(key=lambda c: c[0].lower())
        return commands

    async def discover(self) -> Hits:
        for name, help_text, command in self._commands():
            yield DiscoveryHit(name, command, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, command in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), command, help=help_text)
