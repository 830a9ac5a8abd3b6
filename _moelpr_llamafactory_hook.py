"""Startup hook, run by ``moelpr-llamafactory.pth`` at every Python start.

It only registers an import finder (no torch, no LLaMA-Factory import). Once LLaMA-Factory imports
``llamafactory.model.loader`` (every command that loads a model: train, chat, api, export), moelpr's
model types are registered so MoE-LPR checkpoints load; once it imports ``llamafactory.train.tuner``
(``llamafactory-cli train`` and the ``torchrun`` workers it launches), the plugin is applied.
"""

import importlib.util
import sys
from collections.abc import Callable
from importlib.abc import Loader, MetaPathFinder


def _register_model_types() -> None:
    import moelpr  # noqa: F401  importing it registers the *_moelpr model types with the Auto classes


def _apply_plugin() -> None:
    from moelpr.llamafactory_plugin import apply

    apply()


# LLaMA-Factory module -> what runs right after it has been imported.
AFTER_IMPORT: dict[str, Callable[[], None]] = {
    "llamafactory.model.loader": _register_model_types,
    "llamafactory.train.tuner": _apply_plugin,
}


class _RunAfterLoad(Loader):
    def __init__(self, loader: Loader, action: Callable[[], None]) -> None:
        self._loader = loader
        self._action = action

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._action()


class _PluginFinder(MetaPathFinder):
    def __init__(self, pending: dict[str, Callable[[], None]]) -> None:
        self._pending = pending

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._pending:
            return None
        action = self._pending.pop(fullname)  # one shot per module
        sys.meta_path.remove(self)  # let the real finders answer below
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            if self._pending:
                sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _RunAfterLoad(spec.loader, action)
        return spec


_pending = {name: action for name, action in AFTER_IMPORT.items() if name not in sys.modules}
if _pending:
    sys.meta_path.insert(0, _PluginFinder(_pending))
