"""Every module imports cleanly and does no work at import time (no files, no network)."""

import importlib
import pkgutil

import parley


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(parley.__path__, "parley.") if m.name != "parley.__main__"]
    assert len(names) > 20
    for name in names:
        importlib.import_module(name)
