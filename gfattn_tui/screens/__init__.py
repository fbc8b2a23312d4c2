"""Screens of `gfattn-tui`, one per module."""
