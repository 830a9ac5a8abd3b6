"""Random dense models of real models' shapes (weights random, a small local tokenizer), for benchmarks that must
not download anything, and their upcycled MoE-LPR forms.

    python benchmarks/random_models.py --shape qwen2.5-0.5b --output_dir /tmp/qwen-rand [--num_experts 4 --topk 2]

writes ``OUTPUT_DIR/dense`` and ``OUTPUT_DIR/moe`` (upcycled with ``moelpr upcycle``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import save_dense_model  # noqa: E402  (the tests' random checkpoints and tokenizer)

from moelpr.upcycling.settings import UpcycleSettings
from moelpr.upcycling.upcycle import upcycle  # noqa: E402

# family and config fields of each shape (vocabularies are the real ones; the tokenizer only uses its first ids).
SHAPES = {
    "qwen2.5-0.5b": (
        "qwen2",
        {
            "num_layers": 24,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "max_position_embeddings": 4096,
            "rope_theta": 1000000.0,
        },
    ),
    "smollm2-135m": (
        "llama",
        {
            "num_layers": 30,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
            "max_position_embeddings": 2048,
        },
    ),
    "tiny": ("qwen2", {"num_layers": 2, "max_position_embeddings": 512}),
}


def make_models(shape: str, output_dir: Path, num_experts: int, top_k: int, dtype: torch.dtype) -> tuple[Path, Path]:
    """``(dense_dir, moe_dir)`` under ``output_dir``, made once (reused when already there)."""
    family, fields = SHAPES[shape]
    dense, moe = output_dir / "dense", output_dir / "moe"
    if not (dense / "config.json").exists():
        save_dense_model(dense, family, dtype=dtype, **fields)
    if not (moe / "config.json").exists():
        upcycle(dense, moe, UpcycleSettings(num_experts=num_experts, top_k=top_k))
    return dense, moe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="save the dense model in bf16 (else float32)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    for path in make_models(args.shape, args.output_dir, args.num_experts, args.topk, dtype):
        print(path)


if __name__ == "__main__":
    main()
