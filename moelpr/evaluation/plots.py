"""Figures of the evaluation report: routing heatmaps and training loss curves."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    """matplotlib's pyplot, imported on first use (matplotlib comes with the 'eval' extra, which ``evaluate`` checks
    before it runs a model), drawing to files only: no display on a server or in CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _annotated_heatmap(fig, ax, values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
                       value_range: tuple[float, float], digits: int) -> None:
    low, high = value_range
    image = ax.imshow(values, cmap="viridis", vmin=low, vmax=high, aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=col_labels, fontsize=8)
    ax.set_yticks(range(len(row_labels)), labels=row_labels, fontsize=8)
    ax.tick_params(top=True, bottom=False, labeltop=True, labelbottom=False)
    ax.set_title(title, fontsize=9)
    middle = (low + high) / 2
    for (row, col), value in np.ndenumerate(values):
        # Dark text on the bright end of viridis, light text on the dark end.
        ax.text(col, row, f"{value:.{digits}f}", ha="center", va="center", fontsize=7,
                color="black" if value > middle else "white")
    fig.colorbar(image, ax=ax, shrink=0.8)


def _padded(per_layer: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-layer lists of per-expert values as one array, zeros where a layer has fewer experts."""
    width = max(len(values) for values in per_layer)
    return np.array([list(values) + [0.0] * (width - len(values)) for values in per_layer])


def routing_heatmap(routing: Mapping[str, Mapping], languages: Sequence[str], old_languages: set[str], path: Path) -> None:
    """One column per MoE model. Top: how much each MoE layer uses the original FFN, per language, on a fixed 0-1
    scale so models compare at a glance: for MoE-LPR the share of tokens whose top-1 expert is expert 0 (the
    original FFN), for MoE-CT the mean fusion weight on the frozen FFN. Bottom: each expert's router probability
    averaged over tokens and layers, per language, on a scale fitted to the values (they often differ only in
    the second decimal); where layers have different numbers of experts, a layer without expert ``e`` counts 0
    for it, as the training logs' ``expert_share_{e}`` does."""
    models = list(routing)
    num_layers = max(len(routing[m]["layers"]) for m in models)
    labels = [f"{lang}\n({'old' if lang in old_languages else 'new'})" for lang in languages]
    probs = {
        m: np.array([np.mean(_padded(routing[m]["languages"][lang]["mean_router_prob"]), axis=0) for lang in languages])
        for m in models
    }
    prob_range = (min(p.min() for p in probs.values()), max(p.max() for p in probs.values()))
    plt = _pyplot()
    fig, axes = plt.subplots(
        2, len(models), squeeze=False, layout="constrained",
        figsize=(max(5.0, 1.0 * len(languages) + 2.5) * len(models), 0.28 * num_layers + 0.5 * len(languages) + 3),
        gridspec_kw={"height_ratios": [max(num_layers, 2), len(languages) + 1]},
    )
    for col, model in enumerate(models):
        report = routing[model]
        ct = report.get("method") == "ct"
        key, what = ("ffn_fusion_weight", "mean fusion weight on the frozen FFN") if ct else (
            "expert0_top1_share", "share of tokens whose top-1 expert is expert 0")
        values = np.array([[report["languages"][lang][key][i] for lang in languages] for i in range(len(report["layers"]))])
        _annotated_heatmap(fig, axes[0, col], values, [f"layer {i}" for i in report["layers"]], labels,
                           f"{model} ({'MoE-CT' if ct else 'MoE-LPR'})\n{what}", (0.0, 1.0), 2)
        experts = [f"{'routed' if ct else 'expert'} {e}" for e in range(probs[model].shape[1])]
        _annotated_heatmap(fig, axes[1, col], probs[model], labels, experts,
                           f"{model}\nmean router probability (over tokens and layers)", prob_range, 3)
    fig.suptitle("Use of the original FFN on held-out text (MoE-LPR: expert 0 of the router; MoE-CT: the frozen FFN "
                 "beside the routed experts)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_curves(runs: Mapping[str, Path], path: Path) -> dict[str, list[list[float]]]:
    """Plot the training loss of each run (from LLaMA-Factory's ``trainer_state.json``) in one figure;
    return the plotted ``[step, loss]`` points per run. Runs without a trainer state are skipped."""
    curves = {}
    for name, run_dir in runs.items():
        state_file = run_dir / "trainer_state.json"
        if not state_file.is_file():
            continue
        history = json.loads(state_file.read_text())["log_history"]
        curves[name] = [[entry["step"], entry["loss"]] for entry in history if "loss" in entry and "step" in entry]
    if not curves:
        return curves
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        steps, losses = zip(*points) if points else ((), ())
        ax.plot(steps, losses, marker=".", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return curves
