"""The names the routing statistics are logged and reported under are declared once, in moelpr/models/statistics.py:
no other module of the package spells one (a key re-typed elsewhere could drift from it unnoticed), the keys the
statistics produce and the trainer meters are the declared ones, and the docs name every training-log key."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import torch

from moelpr.evaluation.perplexity import LanguageResult, RoutingTotals
from moelpr.evaluation.report import routing_report
from moelpr.llamafactory_plugin.trainer import RoutingMeter
from moelpr.models import statistics
from moelpr.models.configuration import CT, LPR
from moelpr.models.statistics import (
    EXPERT0_TOP1_SHARE_KEY,
    EXPERT_SHARE_PREFIX,
    FFN_FUSION_WEIGHT_KEY,
    MEAN_ROUTER_PROB_KEY,
    TOP1_SHARE_KEY,
    fusion_stats,
    is_routing_log_key,
    routing_stats,
    training_log_keys,
)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "moelpr"
# The modules that log or read the keys: the trainer (which also feeds LlamaBoard's log), the web UI, the reports.
USERS = [PACKAGE / "llamafactory_plugin" / "trainer.py", PACKAGE / "llamafactory_plugin" / "webui.py"]
USERS += sorted((PACKAGE / "evaluation").glob("*.py"))


def declared_keys() -> set[str]:
    """Every key constant of statistics.py, read from its source (so that a key added there is covered too)."""
    keys = set()
    for node in ast.parse(Path(statistics.__file__).read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            name = node.targets[0].id
            if name.endswith(("_KEY", "_PREFIX")):
                keys.add(node.value.value)
    return keys


def spells_a_key(value: str, keys: set[str]) -> bool:
    return value in keys or value.startswith(EXPERT_SHARE_PREFIX)


def test_the_declaration_holds_every_key_the_statistics_module_uses():
    keys = declared_keys()
    assert {EXPERT_SHARE_PREFIX, FFN_FUSION_WEIGHT_KEY, EXPERT0_TOP1_SHARE_KEY, TOP1_SHARE_KEY} <= keys
    assert set(training_log_keys(3)) - {f"{EXPERT_SHARE_PREFIX}{i}" for i in range(3)} <= keys


def test_no_module_but_statistics_spells_a_key():
    """String literals (f-string parts included) anywhere in the package; in the modules that log or read the keys
    also keyword names (``entry.update(top1_share=...)`` spells a key as much as ``entry["top1_share"]``)."""
    keys = declared_keys()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == Path(statistics.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and spells_a_key(node.value, keys):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
            elif path in USERS and isinstance(node, ast.keyword) and node.arg and spells_a_key(node.arg, keys):
                found.append(f"{path.relative_to(REPO)}:{node.value.lineno}: {node.arg}=")
    assert found == []
    # The scan reads the users it names: they exist and import the keys from statistics.py.
    for path in USERS[:1] + [PACKAGE / "evaluation" / "report.py", PACKAGE / "evaluation" / "plots.py"]:
        imports = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)]
        assert any((n.module or "").endswith("models.statistics") for n in imports), path


def test_what_the_statistics_give_is_what_the_trainer_meters_and_plots():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, 3, generator=generator) for _ in range(2)]
    lang_mask = torch.tensor([1, 0, 1, 0, 1, 0])
    given = routing_stats(logits, 2, lang_mask=lang_mask)
    given |= fusion_stats([torch.rand(6), torch.rand(6)], lang_mask=lang_mask)
    logged = training_log_keys(3)
    assert RoutingMeter(num_experts=3, device="cpu").keys == logged
    assert set(given) <= set(logged) and all(is_routing_log_key(key) for key in logged)
    assert set(logged) - set(given) == {"lm_loss", "aux_loss", "lpr_loss"}  # the trainer adds these from the output
    # The trainer's own keys are not routing keys: no training_loss plot twice, no learning rate in the routing log.
    assert not any(is_routing_log_key(key) for key in ("loss", "grad_norm", "learning_rate", "epoch", "eval_loss"))


def test_routing_json_is_written_under_the_keys_the_heatmap_and_check_read():
    totals = RoutingTotals()
    generator = torch.Generator().manual_seed(1)
    totals.add([torch.randn(8, 2, generator=generator)], [torch.rand(8, generator=generator)])
    result = LanguageResult([1.0], [8], totals)
    config = SimpleNamespace(moe_layers=None, num_hidden_layers=1, num_experts=2, num_experts_per_tok=1)
    for method, ffn_key in ((LPR, EXPERT0_TOP1_SHARE_KEY), (CT, FFN_FUSION_WEIGHT_KEY)):
        entry = routing_report(SimpleNamespace(**vars(config), moe_method=method), {"hu": result}, set())
        stats = entry["languages"]["hu"]
        assert {ffn_key, TOP1_SHARE_KEY, MEAN_ROUTER_PROB_KEY} <= stats.keys()
        assert len(stats[ffn_key]) == 1 and math.isclose(sum(stats[MEAN_ROUTER_PROB_KEY][0]), 1.0, rel_tol=1e-6)


def test_the_docs_name_every_training_log_key():
    docs = (REPO / "docs" / "llamafactory.md").read_text() + (REPO / "docs" / "moect.md").read_text()
    keys = [key for key in training_log_keys(1) if not key.startswith(EXPERT_SHARE_PREFIX)]
    assert [key for key in [*keys, f"{EXPERT_SHARE_PREFIX}{{i}}"] if f"`{key}`" not in docs] == []
