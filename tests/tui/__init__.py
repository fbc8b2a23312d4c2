"""Tests of `gfattn_tui`: pure units, Pilot tests of every screen, SVG snapshots (`__snapshots__/`)."""
