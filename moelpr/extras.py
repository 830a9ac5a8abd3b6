"""moelpr's optional parts (the extras of pyproject.toml) and the one-line error of a command that needs a missing one.

Whether a package is there is asked of Python's import finders, without importing it: lm-eval, DeepSpeed and
llama-cpp-python take seconds to import, and the check runs before anything else does.
"""

from __future__ import annotations

import importlib.util

from .errors import MoELPRUserError

# Extra -> its packages, import name -> distribution name (as pyproject.toml's [project.optional-dependencies] lists
# them; `dev` and `all` only gather these and the tools of the repository).
EXTRAS: dict[str, dict[str, str]] = {
    "eval": {"lm_eval": "lm-eval", "sacrebleu": "sacrebleu", "matplotlib": "matplotlib"},
    "gguf": {"llama_cpp": "llama-cpp-python", "gguf": "gguf"},
    "deepspeed": {"deepspeed": "deepspeed"},
}


class MissingExtraError(MoELPRUserError):
    """A command needs a package of one of moelpr's extras, and it is not installed."""


def importable(module: str) -> bool:
    """Whether ``import module`` would find the (top-level) module, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return False


def missing_packages(extra: str, *modules: str) -> list[str]:
    """The distributions of ``extra`` (only those of ``modules``, when given) that cannot be imported."""
    packages = EXTRAS[extra]
    return [packages[module] for module in (modules or packages) if not importable(module)]


def require(extra: str, *modules: str, purpose: str) -> None:
    """Raise :class:`MissingExtraError` unless the packages of ``extra`` that ``purpose`` needs (``modules``, by
    import name; default: all of them) can be imported."""
    missing = missing_packages(extra, *modules)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingExtraError(
            f"{', '.join(missing)} {verb} not installed ({purpose} needs the '{extra}' extra): "
            f"pip install 'moelpr[{extra}]'"
        )
