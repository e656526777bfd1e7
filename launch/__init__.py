"""Training entry points (run as scripts or with ``python -m launch.<name>`` from the repository root)."""
