"""Data tools: synthetic phantom volumes in memplan's on-disk case format (see models/data.py)."""
