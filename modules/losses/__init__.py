"""Losses as pure functions, one file per method."""
