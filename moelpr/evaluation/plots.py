"""Figures of the evaluation report: routing heatmaps and training loss curves."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _annotated_heatmap(ax, values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str):
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=col_labels)
    ax.set_yticks(range(len(row_labels)), labels=row_labels)
    ax.tick_params(top=True, bottom=False, labeltop=True, labelbottom=False)
    ax.set_title(title, fontsize=10, pad=24)
    for (row, col), value in np.ndenumerate(values):
        # Dark text on the bright end of viridis, light text on the dark end.
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black" if value > 0.6 else "white")
    return image


def routing_heatmap(routing: Mapping[str, Mapping], languages: Sequence[str], old_languages: set[str], path: Path) -> None:
    """One column of panels per MoE model: expert-0 top-1 share per layer x language (top) and the
    router probability of each expert, averaged over layers, per language (bottom)."""
    models = list(routing)
    num_layers = max(len(routing[m]["layers"]) for m in models)
    num_experts = max(routing[m]["num_experts"] for m in models)
    labels = [f"{lang}\n(old)" if lang in old_languages else f"{lang}\n(new)" for lang in languages]
    width = max(4.0, 0.9 * max(len(languages), num_experts) + 1.5)
    fig, axes = plt.subplots(
        2, len(models), squeeze=False, figsize=(width * len(models), 0.3 * num_layers + 0.4 * len(languages) + 4),
        gridspec_kw={"height_ratios": [max(num_layers, 1), max(len(languages), 1) + 1]},
    )
    for col, model in enumerate(models):
        report = routing[model]
        share = np.array([[report["languages"][lang]["expert0_top1_share"][i] for lang in languages] for i in range(len(report["layers"]))])
        image = _annotated_heatmap(
            axes[0, col], share, [f"layer {i}" for i in report["layers"]], labels,
            f"{model}: share of tokens whose top-1 expert is expert 0",
        )
        probs = np.array([np.mean(report["languages"][lang]["mean_router_prob"], axis=0) for lang in languages])
        _annotated_heatmap(
            axes[1, col], probs, labels, [f"expert {e}" for e in range(probs.shape[1])],
            f"{model}: mean router probability (averaged over layers)",
        )
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.5, label="share / probability")
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
