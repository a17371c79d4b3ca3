"""Name -> class registries for attacks and defenses (timm-style, explicit imports)."""
from __future__ import annotations

import fnmatch
import importlib

from .errors import BurnError


class Registry:
    """Classes registered by their ``name`` attribute; ``package`` is imported on first lookup so
    that the built-ins are registered by its explicit imports."""

    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._classes: dict[str, type] = {}

    def register(self, cls):
        if cls.name in self._classes:
            raise ValueError(f"{self.kind} '{cls.name}' is registered twice")
        self._classes[cls.name] = cls
        return cls

    def get(self, name: str) -> type:
        importlib.import_module(self.package)
        try:
            return self._classes[name]
        except KeyError:
            raise BurnError(f"unknown {self.kind} '{name}'; available: {', '.join(sorted(self._classes))}") from None

    def names(self, pattern: str = "*") -> list[str]:
        importlib.import_module(self.package)
        return sorted(n for n in self._classes if fnmatch.fnmatch(n, pattern))
