"""The ``moelpr`` command: ``moelpr upcycle ...``, ``moelpr export ...``, ``moelpr merge ...``, ``moelpr expand ...``,
``moelpr eval ...``, ``moelpr bench ...``."""

from __future__ import annotations

import importlib
import sys

# Subcommand -> module whose ``main(argv) -> int`` runs it; imported only when chosen, because the
# heavy imports (torch, transformers) should not slow down ``moelpr --help``.
SUBCOMMANDS = {
    "upcycle": ("moelpr.cli.upcycle", "upcycle a dense checkpoint into an MoE-LPR or MoE-CT model"),
    "export": (
        "moelpr.cli.export",
        "write an MoE-LPR model as a standard Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint or a GGUF file",
    ),
    "merge": ("moelpr.cli.merge", "write a slim checkpoint (and its chain of bases) as one whole checkpoint"),
    "expand": (
        "moelpr.cli.expand",
        "LLaMA-Pro block expansion of a dense checkpoint (identity-initialised blocks)",
    ),
    "eval": ("moelpr.cli.eval", "per-language perplexity and routing report of one or more models"),
    "bench": ("moelpr.cli.bench", "benchmark accuracy (ARC, HellaSwag, MMLU, Belebele, FLORES) in the paper's layout"),
    "env": ("moelpr.cli.env", "versions, extras, plugin state and device, for a problem report"),
    "estimate": ("moelpr.cli.estimate", "GPU memory, disk and FLOPs of a training stage, from a config.json alone"),
}


def _usage() -> str:
    lines = ["usage: moelpr <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run 'moelpr <command> --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"moelpr: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
