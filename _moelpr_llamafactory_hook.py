"""Startup hook, run by ``moelpr-llamafactory.pth`` at every Python start.

It only registers an import finder (no torch, no LLaMA-Factory import): when
``llamafactory.train.tuner`` -- the module behind ``llamafactory-cli train`` and the ``torchrun``
workers it launches -- has been imported, the finder applies moelpr's LLaMA-Factory plugin.
"""

import importlib.util
import sys
from importlib.abc import Loader, MetaPathFinder

TRIGGER_MODULE = "llamafactory.train.tuner"


class _ApplyPluginAfterLoad(Loader):
    def __init__(self, loader: Loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        from moelpr.llamafactory_plugin import apply

        apply()


class _PluginFinder(MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot, and lets the real finders answer below
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ApplyPluginAfterLoad(spec.loader)
        return spec


if TRIGGER_MODULE not in sys.modules:
    sys.meta_path.insert(0, _PluginFinder())
