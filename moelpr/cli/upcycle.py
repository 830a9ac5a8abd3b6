"""``moelpr upcycle`` (and the seed's ``python upcycling.py``): the command line of
:func:`moelpr.upcycling.upcycle.upcycle`."""

from __future__ import annotations

import argparse
import sys

from ..checkpoints.streaming import DEFAULT_MAX_SHARD_SIZE
from ..models import MOE_FAMILIES
from ..models.configuration import METHOD_NAMES
from ..upcycling.layer_allocation import DEFAULT_MAX_TOKENS
from ..upcycling.settings import ROUTER_INITS, XAVIER, UpcycleSettings
from ..upcycling.upcycle import upcycle
from .layer_allocation import split_paths
from .runner import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"Upcycle a dense checkpoint ({', '.join(sorted(MOE_FAMILIES))}) into an MoE-LPR or MoE-CT model."
    )
    parser.add_argument("--model_path", required=True, help="dense HF checkpoint directory (safetensors weights)")
    parser.add_argument("--output_path", required=True, help="new directory for the MoE checkpoint")
    parser.add_argument(
        "--method",
        choices=list(METHOD_NAMES),
        default="moe_lpr",
        help="moe_lpr (default): the FFN becomes expert 0 of the routed experts; moe_ct: the FFN stays whole and "
        "always active beside routed experts and a fusion layer (docs/moect.md)",
    )
    parser.add_argument(
        "--num_experts",
        default=None,
        help="experts per MoE layer: for moe_lpr expert 0 = original FFN (default 4), for moe_ct the routed experts "
        "beside the FFN (default 2); or per-layer counts like '0-9:2,10-29:4' (layers left out stay dense; not "
        "with --moe_layers); or, for moe_lpr, 'auto:K': K new experts spread over the layers by the cross-lingual "
        "similarity of hidden states on --new_corpus / --old_corpus (LayerMoE; --moe_layers then names the "
        "candidate layers)",
    )
    parser.add_argument(
        "--topk", type=int, default=None, help="experts per token (default 2 for moe_lpr, 1 for moe_ct)"
    )
    parser.add_argument(
        "--moe_layers",
        default=None,
        help="'all' (default), 'every:K', or indices like '0,2,5-7'; other layers stay dense",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    parser.add_argument(
        "--router_init",
        choices=list(ROUTER_INITS),
        default=XAVIER,
        help="xavier (default, the MoE-LPR authors'): std sqrt(2 / (hidden + num_experts)); normal: std = the "
        "config's initializer_range (this project's initialisation before; the demo's figures were measured with it)",
    )
    parser.add_argument(
        "--new_corpus",
        type=split_paths,
        default=None,
        metavar="FILE[,FILE]",
        help='with auto:K: jsonl texts ({"text": ...}) of the new languages, comma-separated',
    )
    parser.add_argument(
        "--old_corpus",
        type=split_paths,
        default=None,
        metavar="FILE[,FILE]",
        help="with auto:K: jsonl texts of the languages the model already knows",
    )
    parser.add_argument(
        "--allocation_max_tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"with auto:K: tokens read from each corpus (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--slim",
        action="store_true",
        help="write only the routers (and MoE-CT's fusion layers) and a reference to --model_path; the experts are "
        "copied from the dense model whenever the checkpoint loads (docs/checkpoints.md)",
    )
    parser.add_argument(
        "--max_shard_size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest weight file written, as in save_pretrained (default {DEFAULT_MAX_SHARD_SIZE}; e.g. 2GB, 500MB)",
    )
    return parser


def _upcycle(args: argparse.Namespace) -> None:
    settings = UpcycleSettings(
        method=args.method,
        num_experts=args.num_experts,
        top_k=args.topk,
        moe_layers=args.moe_layers,
        router_init=args.router_init,
        seed=args.seed,
        slim=args.slim,
        max_shard_size=args.max_shard_size,
        new_corpora=args.new_corpus,
        old_corpora=args.old_corpus,
        allocation_max_tokens=args.allocation_max_tokens,
    )
    out = upcycle(args.model_path, args.output_path, settings)
    print(f"Upcycled checkpoint written to {out}")


def main(argv: list[str] | None = None) -> int:
    return run_command("upcycle", build_parser(), _upcycle, argv)


if __name__ == "__main__":
    sys.exit(main())
