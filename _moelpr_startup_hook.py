"""Startup hook, run by ``moelpr-startup.pth`` at every Python start of an environment with moelpr installed.

It only registers an import finder (no torch, no transformers, no LLaMA-Factory import); the finder runs
an action right after a given module has been imported:

- ``transformers.models.auto.configuration_auto``: looking up a model type ending in ``_moelpr`` in the
  Auto classes' config mapping imports moelpr first, which registers its config and model classes. So
  ``AutoConfig``, ``AutoModelForCausalLM``, ``AutoTokenizer``, ``pipeline`` and the tools built on them
  (``lm_eval --model hf``, LLaMA-Factory's chat, api and export commands) open MoE-LPR checkpoints with no
  ``import moelpr``, and torch and moelpr load only when such a checkpoint is opened.
- ``llamafactory.train.tuner`` (``llamafactory-cli train`` and the ``torchrun`` workers it launches): the
  LLaMA-Factory plugin is applied.
- ``llamafactory.webui.interface`` (``llamafactory-cli webui``): the plugin's LlamaBoard part is applied too.

The plugin never breaks its host: with a LLaMA-Factory or transformers release outside :data:`PLUGIN_RELEASES`
(the ones its patches were checked against) nothing is patched and moelpr is not even imported, so LLaMA-Factory
runs as if moelpr were not installed, after one warning line; only a recipe asking for ``finetuning_type: moelpr``
is refused, in one line naming the supported releases.
"""

import importlib.util
import sys
from collections.abc import Callable
from importlib.abc import Loader, MetaPathFinder
from types import ModuleType

# Every MoE-LPR model type is its dense family's model type plus this suffix (llama_moelpr, qwen2_moelpr, ...).
MODEL_TYPE_SUFFIX = "_moelpr"
# The transformers releases whose config lookup (``_LazyConfigMapping.__contains__``/``__getitem__``, the
# only way AutoConfig.from_pretrained and AutoConfig.for_model resolve a model type) this hook was checked
# against. With any other release it changes nothing, and ``import moelpr`` still registers the types.
CHECKED_TRANSFORMERS = ">=5.6,<5.7"
# The releases the LLaMA-Factory plugin's patches were checked against (pyproject.toml requires the same ranges).
PLUGIN_RELEASES = {"llamafactory": ">=0.9.5,<0.9.6", "transformers": CHECKED_TRANSFORMERS}
MOELPR_FINETUNING_TYPE = "moelpr"


def _register_model_types_on_lookup(configuration_auto: ModuleType) -> None:
    from packaging.specifiers import SpecifierSet  # transformers has imported it already

    if sys.modules["transformers"].__version__ not in SpecifierSet(CHECKED_TRANSFORMERS):
        return
    mapping = configuration_auto.CONFIG_MAPPING
    base = configuration_auto._LazyConfigMapping
    if type(mapping) is not base:
        return

    class ConfigMappingRegisteringMoELPR(base):
        """transformers' model type -> config class mapping; a ``*_moelpr`` type imports moelpr on first lookup."""

        def _register_moelpr_for(self, model_type: object) -> None:
            if isinstance(model_type, str) and model_type.endswith(MODEL_TYPE_SUFFIX):
                if not super().__contains__(model_type):
                    import moelpr  # noqa: F401  registers the *_moelpr config and model classes with the Auto classes

        def __contains__(self, model_type: object) -> bool:
            self._register_moelpr_for(model_type)
            return super().__contains__(model_type)

        def __getitem__(self, model_type: str):
            self._register_moelpr_for(model_type)
            return super().__getitem__(model_type)

    # Only this one instance changes class: isinstance checks and register() behave as before.
    mapping.__class__ = ConfigMappingRegisteringMoELPR


def plugin_releases() -> str:
    """The releases the plugin supports, as a user would pass them to pip."""
    return " with ".join(f"{name}{specifier}" for name, specifier in PLUGIN_RELEASES.items())


def releases_outside_plugin_ranges() -> list[str]:
    """The installed releases outside :data:`PLUGIN_RELEASES` (``"llamafactory 0.9.6"``); empty where the plugin
    applies. Read from the installed packages' metadata, without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet

    outside = []
    for name, specifier in PLUGIN_RELEASES.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            outside.append(f"{name} (not installed)")
            continue
        if installed not in SpecifierSet(specifier):
            outside.append(f"{name} {installed}")
    return outside


def recipe_asks_for_moelpr(argv: list[str]) -> bool:
    """Whether the arguments LLaMA-Factory is about to parse (``sys.argv`` as its ``read_args`` takes it: a YAML or
    JSON recipe and ``key=value`` overrides, or ``--key value`` options) set ``finetuning_type: moelpr``. A recipe
    that cannot be read counts as not asking: LLaMA-Factory reports it itself."""
    args = argv[1:]
    if args and args[0].endswith((".yaml", ".yml", ".json")):
        overrides = [arg.partition("=")[2] for arg in args[1:] if arg.startswith("finetuning_type=")]
        if overrides:
            return overrides[-1] == MOELPR_FINETUNING_TYPE
        try:
            import yaml  # a JSON recipe is YAML too

            with open(args[0], encoding="utf-8") as recipe_file:
                recipe = yaml.safe_load(recipe_file)
        except Exception:  # noqa: BLE001 - any unreadable recipe is LLaMA-Factory's to report
            return False
        return isinstance(recipe, dict) and recipe.get("finetuning_type") == MOELPR_FINETUNING_TYPE
    values = [value.partition("=")[2] for value in args if value.startswith("--finetuning_type=")]
    values += [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--finetuning_type"]
    return bool(values) and values[-1] == MOELPR_FINETUNING_TYPE


_warned = False


def _stand_aside(outside: list[str]) -> None:
    """Outside the checked releases: refuse a moelpr recipe in one line, otherwise warn once and patch nothing."""
    global _warned
    installed = ", ".join(outside)
    if recipe_asks_for_moelpr(sys.argv):
        install = " ".join(f"'{name}{specifier}'" for name, specifier in PLUGIN_RELEASES.items())
        print(
            f"[moelpr] error: finetuning_type: moelpr needs {plugin_releases()}, and {installed} is installed: "
            f"pip install {install}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if not _warned:
        _warned = True
        print(
            f"[moelpr] warning: moelpr's LLaMA-Factory plugin is off ({installed} is installed, the plugin supports "
            f"{plugin_releases()}); LLaMA-Factory runs without it",
            file=sys.stderr,
        )


def _apply_plugin(_tuner: ModuleType) -> None:
    outside = releases_outside_plugin_ranges()
    if outside:
        _stand_aside(outside)
        return
    from moelpr.llamafactory_plugin import apply

    apply()


def _apply_webui_plugin(_interface: ModuleType) -> None:
    outside = releases_outside_plugin_ranges()
    if outside:
        _stand_aside(outside)  # LlamaBoard without the moelpr method and panel
        return
    from moelpr.llamafactory_plugin import apply_webui

    apply_webui()


# Module -> what runs right after it has been imported.
AFTER_IMPORT: dict[str, Callable[[ModuleType], None]] = {
    "transformers.models.auto.configuration_auto": _register_model_types_on_lookup,
    "llamafactory.train.tuner": _apply_plugin,
    "llamafactory.webui.interface": _apply_webui_plugin,
}


class _RunAfterLoad(Loader):
    def __init__(self, loader: Loader, action: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._action = action

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._action(module)


class _AfterImportFinder(MetaPathFinder):
    def __init__(self, pending: dict[str, Callable[[ModuleType], None]]) -> None:
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
    sys.meta_path.insert(0, _AfterImportFinder(_pending))
