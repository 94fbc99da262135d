"""Frys Edge: an embedded edge runtime.

The public API, imported lazily so `frys --version` stays fast:

- `Runtime`, `serve`: the kernel (`async with Runtime(config) as rt:`)
- `load_config`, `Config`, `ConfigError`: configuration
- `Storage`, `StorageError`, `VersionConflict`: the SQLite store
- `FrysError`: the root of every error the runtime raises
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Runtime": "frys_edge.runtime",
    "serve": "frys_edge.runtime",
    "load_config": "frys_edge.config",
    "Config": "frys_edge.config",
    "ConfigError": "frys_edge.config",
    "Storage": "frys_edge.storage",
    "StorageError": "frys_edge.storage",
    "VersionConflict": "frys_edge.storage",
    "FrysError": "frys_edge.core",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'frys_edge' has no attribute {name!r}")
    return getattr(import_module(module), name)
