"""Router gradient of the LPR term in the paper's form and the authors' (``lpr_loss_form``), across router-logit scales.

``python benchmarks/lpr_gradient.py [--num_experts 4] [--hidden 576] [--tokens 4096]``

For each logit scale a router ``[N, hidden]`` is drawn so that its logits on unit-variance hidden states have that
standard deviation; every token is an old-language token. Printed: the LPR loss and the norm of its gradient on the
router weights in both forms, and their ratio (paper / authors), the mean over 5 draws. The gradient is what
``lpr_loss_coef`` multiplies, so the ratio says how much larger the same coefficient acts in the paper's form.
"""

from __future__ import annotations

import argparse
import math

import torch

from moelpr.models.routing import lpr_loss

SCALES = (0.1, 0.3, 1.0, 3.0)
DRAWS = 5


def gradient_norm(hidden: torch.Tensor, router: torch.Tensor, form: str) -> tuple[float, float]:
    """``(loss, ||d loss / d router||)`` of the LPR term on ``hidden`` (all tokens old-language)."""
    router = router.clone().requires_grad_(True)
    old = torch.ones(hidden.shape[0], dtype=torch.bool)
    loss = lpr_loss(hidden @ router.T, old, form)
    (grad,) = torch.autograd.grad(loss, router)
    return loss.item(), grad.norm().item()


def measure(num_experts: int, hidden_size: int, tokens: int) -> list[dict[str, float]]:
    rows = []
    for scale in SCALES:
        sums = {"paper_loss": 0.0, "paper_grad": 0.0, "authors_loss": 0.0, "authors_grad": 0.0}
        for draw in range(DRAWS):
            generator = torch.Generator().manual_seed(draw)
            hidden = torch.randn(tokens, hidden_size, generator=generator)
            # Logit std = ||row|| * 1 for unit-variance hidden states: rows of norm `scale`.
            router = torch.randn(num_experts, hidden_size, generator=generator) * scale / math.sqrt(hidden_size)
            for form in ("paper", "authors"):
                loss, grad = gradient_norm(hidden, router, form)
                sums[f"{form}_loss"] += loss / DRAWS
                sums[f"{form}_grad"] += grad / DRAWS
        rows.append({"scale": scale, **sums, "ratio": sums["paper_grad"] / sums["authors_grad"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=576, help="router input width (576: SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    print(f"N = {args.num_experts} experts, hidden {args.hidden}, {args.tokens} old-language tokens, mean of {DRAWS}")
    print(
        "| logit std | LPR loss, paper | LPR loss, authors | grad norm, paper | grad norm, authors | paper / authors |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for row in measure(args.num_experts, args.hidden, args.tokens):
        print(
            f"| {row['scale']:g} | {row['paper_loss']:.3f} | {row['authors_loss']:.3f} | {row['paper_grad']:.4f} "
            f"| {row['authors_grad']:.4f} | {row['ratio']:.1f}x |"
        )


if __name__ == "__main__":
    main()
