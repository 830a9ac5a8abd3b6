"""``moelpr estimate``: parameters, GPU memory, disk and training FLOPs of a stage, from a config.json alone."""

from __future__ import annotations

import argparse
import sys

from ..estimate import DTYPE_BYTES, GIB, STAGES, ZERO_STAGES, Estimate, Setup, estimate, read_config
from ..models.configuration import DEFAULT_EXPERTS, METHOD_NAMES
from ..upcycling.upcycle import expert_layout
from .runner import run_command


def format_table(result: Estimate) -> str:
    """The estimate as a Markdown table (readable as plain text too)."""
    shape = result.shape

    def params(n: float) -> str:
        return f"{n / 1e9:,.2f} B" if n >= 1e8 else f"{n / 1e6:,.2f} M"

    def gib(n: float) -> str:
        return f"{n / GIB:,.1f} GiB" if n >= GIB else f"{n / 2**20:,.1f} MiB"

    rows = [
        ("parameters: total (dense model)", f"{params(shape.total)} ({params(shape.dense_total)})"),
        ("parameters: trained", params(shape.trained)),
        ("parameters: active per token", params(shape.active)),
    ]
    rows += [(f"per GPU: {name}", gib(value)) for name, value in result.memory.items()]
    if result.cpu_memory_per_node:
        rows.append(("CPU memory per node (offloaded states)", gib(result.cpu_memory_per_node)))
    rows += [(f"disk: {name}", gib(value)) for name, value in result.disk.items()]
    flops = result.flops_per_token
    rows += [
        ("training GFLOPs per token: this stage", f"{flops['stage'] / 1e9:,.2f}"),
        ("training GFLOPs per token: dense full training", f"{flops['dense full training'] / 1e9:,.2f}"),
        ("training FLOPs: this stage / dense full training", f"{flops['ratio']:.2f}x"),
    ]
    width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = [
        f"Estimate: {result.description}",
        "",
        f"| {'':<{width}} | {'estimate':>{value_width}} |",
        f"|{'-' * (width + 2)}|{'-' * (value_width + 1)}:|",
    ]
    lines += [f"| {label:<{width}} | {value:>{value_width}} |" for label, value in rows]
    lines += [
        "",
        "Not counted: the CUDA context, communication buffers, fragmentation; leave about a tenth of each GPU free "
        "(docs/estimate.md).",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelpr estimate",
        description="Estimate a training stage's parameters, GPU memory, disk and FLOPs from a model's config.json "
        "(no weights, no GPU). An estimate: see docs/estimate.md for what it counts and its measured error.",
    )
    parser.add_argument("--config", required=True, help="a config.json, or a (dense or upcycled) model directory")
    parser.add_argument("--method", choices=list(METHOD_NAMES), default=None, help="dense config: default moe_lpr")
    parser.add_argument(
        "--num_experts", default=None, help="dense config: as `moelpr upcycle --num_experts` (default 4; moe_ct 2)"
    )
    parser.add_argument("--topk", type=int, default=None, help="dense config: experts per token (default 2; moe_ct 1)")
    parser.add_argument("--moe_layers", default=None, help="dense config: 'all' (default), 'every:K' or '0,2,5-7'")
    parser.add_argument("--stage", choices=STAGES, default=STAGES[0], help="moelpr_stage (default post_pretrain)")
    parser.add_argument("--no_train_embeddings", action="store_true", help="MoE-CT: moect_train_embeddings: false")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in all (default 8)")
    parser.add_argument("--nodes", type=int, default=1, help="machines the GPUs are on (default 1)")
    parser.add_argument("--zero", type=int, choices=ZERO_STAGES, default=2, help="DeepSpeed ZeRO stage, 0: none")
    parser.add_argument("--offload_optimizer", action="store_true", help="ZeRO offload_optimizer to the CPU")
    parser.add_argument("--offload_params", action="store_true", help="ZeRO-3 offload_param to the CPU")
    parser.add_argument("--micro_batch", type=int, default=1, help="per_device_train_batch_size (default 1)")
    parser.add_argument("--cutoff_len", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument(
        "--no_gradient_checkpointing",
        action="store_true",
        help="disable_gradient_checkpointing: true (LLaMA-Factory checkpoints by default)",
    )
    parser.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16", help="training precision (default bf16)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON instead of a table")
    return parser


def _estimate(args: argparse.Namespace) -> None:
    setup = Setup(
        stage=args.stage,
        gpus=args.gpus,
        nodes=args.nodes,
        zero_stage=args.zero,
        offload_optimizer=args.offload_optimizer,
        offload_params=args.offload_params,
        micro_batch=args.micro_batch,
        cutoff_len=args.cutoff_len,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        dtype=args.dtype,
        train_embeddings=not args.no_train_embeddings,
    )
    num_experts, moe_layers = args.num_experts, args.moe_layers
    if num_experts is not None or moe_layers is not None:
        # `moelpr upcycle`'s own reading of the two options (per-layer counts, layer ranges, their checks).
        method = METHOD_NAMES[args.method or "moe_lpr"]
        default_experts, default_top_k = DEFAULT_EXPERTS[method]
        num_layers = read_config(args.config).num_hidden_layers
        moe_layers, num_experts = expert_layout(
            default_experts if num_experts is None else num_experts,
            moe_layers,
            default_top_k if args.topk is None else args.topk,
            num_layers,
            method,
        )
    result = estimate(args.config, setup, args.method, num_experts, args.topk, moe_layers)
    print(result.to_json() if args.json else format_table(result))


def main(argv: list[str] | None = None) -> int:
    return run_command("estimate", build_parser(), _estimate, argv)


if __name__ == "__main__":
    sys.exit(main())
