"""Command-line tools (``python -m tools.NAME``): they may import every other package."""
