"""Run the evaluation over models x languages and write the report files."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..extras import require
from ..jsonl_texts import iter_jsonl_texts
from ..models.configuration import CT, LPR
from ..tokenization import restore_add_bos_token
from .intervals import DEFAULT_LEVEL, DEFAULT_SAMPLES, change_interval, document_units, perplexity_interval
from .perplexity import SPREAD_DOCUMENTS, LanguageResult, evaluate_language, packed_blocks
from .plots import loss_curves, routing_heatmap

logger = logging.getLogger(__name__)


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """The ``text_field`` of every line of a jsonl file."""
    return list(iter_jsonl_texts(path, text_field))


def read_document_ids(path: Path) -> list[str]:
    """Each non-empty line's ``id`` (the demo's corpora builder writes the help page's path, the same in every
    language), or ``FILE#LINE`` where a line has none."""
    ids = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                ids.append(str(json.loads(line).get("id", f"{Path(path).name}#{number}")))
    return ids


def load_model(path: Path, dtype: torch.dtype):
    """Model and tokenizer of a checkpoint directory; ``import moelpr`` registers the MoE-LPR types."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moelpr  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(path)
    restore_add_bos_token(tokenizer)  # token_blocks starts blocks with bos as LLaMA-Factory does
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tokenizer


def is_moe(model) -> bool:
    return model.config.model_type.endswith("_moelpr")


def moe_layer_indices(config) -> list[int]:
    indices = getattr(config, "moe_layer_indices", None)
    if indices is not None:
        return list(indices)
    return list(config.moe_layers) if config.moe_layers is not None else list(range(config.num_hidden_layers))


def _with_intervals(results: Mapping[str, dict], languages: Sequence[str]) -> None:
    """Add to every cell its perplexity interval and, for every model after the first (the baseline), the change
    against the baseline with its interval (paired where both saw the same documents)."""
    baseline = next(iter(results))
    for name, report in results.items():
        for lang in languages:
            cell = report["languages"][lang]
            cell["interval"] = list(perplexity_interval(cell["document_nll"], cell["document_tokens"]))
            if name == baseline:
                continue
            base = results[baseline]["languages"][lang]
            paired = cell["document_ids"] == base["document_ids"]
            interval = change_interval(document_units(base), document_units(cell), paired)
            cell["change_vs_baseline"] = {
                "value": cell["perplexity"] / base["perplexity"] - 1,
                "interval": list(interval),
                "paired": paired,
            }


def routing_report(config: Any, per_language: Mapping[str, LanguageResult], old_languages: set[str]) -> dict:
    """routing.json's entry for one MoE model: per language and MoE layer, each expert's top-1 share and mean
    router probability, and how much the original FFN is used: MoE-LPR's share of tokens whose top-1 expert is
    expert 0 (``expert0_top1_share``), MoE-CT's mean fusion weight on the frozen FFN (``ffn_fusion_weight``;
    its routed experts are all new, so expert 0 is not the FFN there)."""
    method = getattr(config, "moe_method", LPR)
    languages = {}
    for lang, result in per_language.items():
        totals = result.routing
        entry = {"role": "old" if lang in old_languages else "new", "tokens": totals.tokens}
        if method == CT:
            entry["ffn_fusion_weight"] = totals.ffn_fusion_weight()
        else:
            entry["expert0_top1_share"] = totals.expert0_top1_share()
        entry.update(top1_share=totals.top1_share(), mean_router_prob=totals.mean_router_prob())
        languages[lang] = entry
    return {
        "method": method,
        "layers": moe_layer_indices(config),
        "num_experts": config.num_experts,  # one count, or one per entry of "layers"
        "top_k": config.num_experts_per_tok,
        "languages": languages,
    }


def _perplexity_markdown(results: Mapping[str, Mapping], languages: Sequence[str], old: set[str], settings: Mapping) -> str:
    header = [f"{lang} ({'old' if lang in old else 'new'})" for lang in languages]
    level = round(100 * settings["bootstrap"]["level"])
    lines = [
        "# Held-out perplexity (token-weighted, lower is better)",
        "",
        f"Each cell: perplexity [{level}% bootstrap interval over the held-out documents].",
        "",
        "| model | " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(languages),
    ]
    for name, report in results.items():
        cells = []
        for lang in languages:
            cell = report["languages"][lang]
            low, high = cell["interval"]
            cells.append(f"{cell['perplexity']:.2f} [{low:.2f}, {high:.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    baseline = next(iter(results))
    if len(results) > 1:
        paired = [report["languages"][lang]["change_vs_baseline"]["paired"]
                  for report in list(results.values())[1:] for lang in languages]
        how = ("paired over the same documents" if all(paired) else
               "models resampled independently: they saw different documents" if not any(paired) else
               "paired over the same documents, except the cells marked `(unpaired)`: different documents")
        lines += [
            "",
            f"Change relative to `{baseline}` [{level}% interval, {how}]; `*` where the interval excludes 0:",
            "",
            "| model | " + " | ".join(header) + " |",
            "|---|" + "---:|" * len(languages),
        ]
        for name, report in list(results.items())[1:]:
            cells = []
            for lang in languages:
                change = report["languages"][lang]["change_vs_baseline"]
                low, high = change["interval"]
                mark = "*" if low > 0 or high < 0 else ""
                unpaired = "" if change["paired"] or not any(paired) else " (unpaired)"
                cells.append(f"{100 * change['value']:+.1f}%{mark} [{100 * low:+.1f}, {100 * high:+.1f}]{unpaired}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tokens = ", ".join(f"{lang}: {results[baseline]['languages'][lang]['predicted_tokens']}" for lang in languages)
    speed = ", ".join(f"{name}: {report['eval_tokens_per_second']:.0f}" for name, report in results.items())
    lines += [
        "",
        (
            f"Predicted tokens per language ({baseline}'s tokenizer): {tokens}. "
            f"Blocks of {settings['cutoff_len']} tokens, dtype {settings['dtype']}. "
            f"Evaluation tokens/s: {speed}."
        ),
        "",
    ]
    return "\n".join(lines)


def evaluate(
    models: Mapping[str, Path],
    heldout: Mapping[str, Path],
    old_languages: set[str],
    output_dir: Path,
    cutoff_len: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    runs: Mapping[str, Path] | None = None,
    text_field: str = "text",
) -> dict:
    """Evaluate every model on every held-out language and write to ``output_dir``:
    ``perplexity.{md,json}``; for MoE models ``routing.json`` and ``routing_heatmap.png``; with ``runs``
    ``loss_curves.{png,json}``. Returns the perplexity report."""
    require("eval", "matplotlib", purpose="moelpr eval (its plots)")
    output_dir.mkdir(parents=True, exist_ok=True)
    texts = {lang: read_texts(path, text_field) for lang, path in heldout.items()}
    ids = {lang: read_document_ids(path) for lang, path in heldout.items()}
    languages = list(heldout)
    settings = {
        "cutoff_len": cutoff_len,
        "max_tokens": max_tokens,
        "max_tokens_spread_over_documents": SPREAD_DOCUMENTS,  # absent from reports of pages taken whole in order
        "dtype": str(dtype).removeprefix("torch."),
        "bootstrap": {"unit": "held-out documents", "samples": DEFAULT_SAMPLES, "level": DEFAULT_LEVEL},
    }
    results: dict[str, dict] = {}
    routing: dict[str, dict] = {}
    for name, path in models.items():
        start = time.time()
        model, tokenizer = load_model(path, dtype)
        moe = is_moe(model)
        per_language: dict[str, LanguageResult] = {}
        compute_seconds = 0.0
        for lang in languages:
            blocks, owners = packed_blocks(tokenizer, texts[lang], cutoff_len, max_tokens)
            lang_start = time.perf_counter()
            per_language[lang] = evaluate_language(model, blocks, batch_size, moe, f"{name} / {lang}", owners)
            compute_seconds += time.perf_counter() - lang_start
            logger.info("%s / %s: perplexity %.2f over %d tokens", name, lang, per_language[lang].perplexity, per_language[lang].predicted_tokens)
        results[name] = {
            "path": str(path),
            "kind": "moe" if moe else "dense",
            "languages": {
                lang: {
                    "role": "old" if lang in old_languages else "new",
                    "perplexity": r.perplexity,
                    "nll_sum": r.nll_sum,
                    "predicted_tokens": r.predicted_tokens,
                    "block_nll": r.block_nll,
                    "block_tokens": r.block_tokens,
                    "blocks_digest": r.blocks_digest,
                    "document_nll": r.document_nll,
                    "document_tokens": r.document_tokens,
                    "document_ids": [ids[lang][index] for index in r.document_indices],
                }
                for lang, r in per_language.items()
            },
            "seconds": round(time.time() - start, 1),
            "eval_tokens_per_second": sum(r.predicted_tokens for r in per_language.values()) / compute_seconds,
        }
        if moe:
            routing[name] = routing_report(model.config, per_language, old_languages)
        del model

    _with_intervals(results, languages)
    report = {"settings": settings, "languages": {lang: "old" if lang in old_languages else "new" for lang in languages}, "models": results}
    (output_dir / "perplexity.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "perplexity.md").write_text(_perplexity_markdown(results, languages, old_languages, settings))
    if routing:
        (output_dir / "routing.json").write_text(json.dumps(routing, indent=2) + "\n")
        routing_heatmap(routing, languages, old_languages, output_dir / "routing_heatmap.png")
    if runs:
        curves = loss_curves(runs, output_dir / "loss_curves.png")
        (output_dir / "loss_curves.json").write_text(json.dumps(curves, indent=2) + "\n")
        missing = sorted(set(runs) - set(curves))
        if missing:
            logger.warning("No trainer_state.json for run(s) %s; left out of loss_curves.png", ", ".join(missing))
    return report
