"""Widgets of `gfattn-tui`, one per module."""
