"""Check MoE-LPR's freeze rules on saved checkpoints, bit for bit: stage 1 changed only routers and new experts
(every router among them), stage 2 only routers; every other tensor, expert 0 included, is the upcycled one.

    python benchmarks/check_freeze.py --upcycled UPCYCLED --stage1 STAGE1 --stage2 STAGE2 [--json OUT.json]

Exits 1 (after printing what broke the rules) when a rule does not hold. Reads one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moelpr.checkpoints.slim import ComposedCheckpoint


def changed_tensors(before_dir: str, after_dir: str) -> tuple[set[str], list[str]]:
    """Names whose tensors differ (values or dtype), and problems (tensors present in only one checkpoint). Stage
    outputs are slim: each is composed with the checkpoints it references."""
    before, after = ComposedCheckpoint(before_dir), ComposedCheckpoint(after_dir)
    problems = [f"{name}: in only one of the two checkpoints" for name in set(before.names()) ^ set(after.names())]
    changed = set()
    for name in before.names():
        if name in after:
            old, new = before.get(name), after.get(name)
            if old.dtype != new.dtype or not torch.equal(old, new):
                changed.add(name)
    return changed, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upcycled", required=True)
    parser.add_argument("--stage1", required=True)
    parser.add_argument("--stage2", required=True)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    routers = {name for name in ComposedCheckpoint(args.upcycled).names() if ".mlp.router." in name}
    stage1, problems1 = changed_tensors(args.upcycled, args.stage1)
    stage2, problems2 = changed_tensors(args.stage1, args.stage2)
    problems = problems1 + problems2
    stage1_trainable = (".mlp.router.", ".mlp.new_experts.")
    problems += [f"stage 1 changed {n}" for n in sorted(stage1) if not any(part in n for part in stage1_trainable)]
    problems += [f"stage 1 left the router {n} unchanged" for n in sorted(routers - stage1)]
    if not any(".mlp.new_experts." in n for n in stage1):
        problems.append("stage 1 changed no new expert")
    problems += [f"stage 2 changed {n}" for n in sorted(stage2 - routers)]
    problems += [f"stage 2 left the router {n} unchanged" for n in sorted(routers - stage2)]
    result = {
        "stage1_changed": len(stage1),
        "stage2_changed": len(stage2),
        "routers": len(routers),
        "freeze_rules_hold": not problems,
        "problems": problems[:20],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    sys.exit(0 if not problems else 1)


if __name__ == "__main__":
    main()
