"""The version of aioshm: the single source of truth (pyproject.toml reads it through hatch)."""

__version__ = "0.1.0"
