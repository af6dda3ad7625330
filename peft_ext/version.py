"""The peft-ext version, in a module of its own so that any module can read it without importing the package root
(hatch reads it from here too: ``[tool.hatch.version]`` in pyproject.toml)."""

__version__ = "0.1.0"
