"""Callbacks shared by every method."""
