"""What each GGUF output type costs: file size, llama.cpp prompt and generation tokens/s beside transformers',
and held-out perplexity per language beside the float32 model's.

Run by hand, not in CI; results are written down in docs/export.md ("GGUF for llama.cpp").

    python benchmarks/gguf_export.py --model_path MOELPR_DIR --work_dir DIR \
        --heldout hu=work/corpora/hu_heldout.jsonl --heldout en=work/corpora/en_heldout.jsonl \
        [--outtypes f32,f16,bf16,q8_0,q4_k_m] [--max_tokens 2048] [--threads 2]

Every GGUF is made by ``moelpr export --format gguf``. Perplexity: each language's held-out documents are
tokenized and concatenated (up to ``--max_tokens`` tokens), cut into 256-token windows, and every engine scores the
same windows (mean negative log-likelihood of each window's tokens after its first). Prompt speed: one 256-token
window evaluated at once. Generation speed: 64 greedy tokens after a short prompt, batch 1, with the KV cache. The
float32 transformers model is the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelpr.cli.export import main as export_main

WINDOW = 256
NEW_TOKENS = 64


def heldout_windows(tokenizer, path: Path, max_tokens: int) -> list[list[int]]:
    ids: list[int] = []
    for line in path.read_text().splitlines():
        ids += tokenizer(json.loads(line)["text"])["input_ids"]
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    return [ids[i : i + WINDOW] for i in range(0, len(ids) - 1, WINDOW) if len(ids[i : i + WINDOW]) > 1]


def nll_sum(log_probs: np.ndarray, ids: list[int]) -> float:
    return -float(sum(log_probs[p, ids[p + 1]] for p in range(len(ids) - 1)))


@torch.inference_mode()
def transformers_figures(model_dir: Path, windows: dict[str, list[list[int]]], prompt: list[int], threads: int) -> dict:
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ppl = {}
    for lang, chunks in windows.items():
        total, count = 0.0, 0
        for ids in chunks:
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            total += nll_sum(torch.log_softmax(logits, -1).numpy(), ids)
            count += len(ids) - 1
        ppl[lang] = math.exp(total / count)
    window = next(iter(windows.values()))[0]
    start = time.perf_counter()
    model(input_ids=torch.tensor([window]))
    prompt_tps = len(window) / (time.perf_counter() - start)
    start = time.perf_counter()
    model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                   pad_token_id=0)
    gen_tps = NEW_TOKENS / (time.perf_counter() - start)
    return {"ppl": ppl, "prompt_tps": prompt_tps, "gen_tps": gen_tps}


def llama_cpp_figures(gguf: Path, windows: dict[str, list[list[int]]], prompt: list[int], threads: int) -> dict:
    engine = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_batch=512, logits_all=True, n_threads=threads,
                             verbose=False)
    ppl = {}
    for lang, chunks in windows.items():
        total, count = 0.0, 0
        for ids in chunks:
            engine.reset()
            engine.eval(ids)
            logits = np.asarray(engine.scores[: len(ids)], dtype=np.float64)
            total += nll_sum(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True), ids)
            count += len(ids) - 1
        ppl[lang] = math.exp(total / count)
    window = next(iter(windows.values()))[0]
    engine.reset()
    start = time.perf_counter()
    engine.eval(window)
    prompt_tps = len(window) / (time.perf_counter() - start)
    engine.reset()
    engine.eval(prompt)
    start = time.perf_counter()
    for _ in range(NEW_TOKENS):  # greedy, one token per step with the KV cache
        engine.eval([int(np.argmax(engine.scores[engine.n_tokens - 1]))])
    gen_tps = NEW_TOKENS / (time.perf_counter() - start)
    engine.close()
    return {"ppl": ppl, "prompt_tps": prompt_tps, "gen_tps": gen_tps, "size_bytes": gguf.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", type=Path, required=True)
    parser.add_argument("--work_dir", type=Path, required=True)
    parser.add_argument("--heldout", action="append", required=True, metavar="LANG=FILE")
    parser.add_argument("--outtypes", default="f32,f16,bf16,q8_0,q4_k_m")
    parser.add_argument("--max_tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    windows = {}
    for pair in args.heldout:
        lang, path = pair.split("=", 1)
        windows[lang] = heldout_windows(tokenizer, Path(path), args.max_tokens)
    prompt = tokenizer("The LibreOffice help explains")["input_ids"]
    report = {"transformers_f32": transformers_figures(args.model_path, windows, prompt, args.threads)}
    print(json.dumps(report), flush=True)
    for outtype in args.outtypes.split(","):
        gguf = args.work_dir / f"model-{outtype}.gguf"
        if not gguf.exists():
            assert export_main(["--model_path", str(args.model_path), "--output_path", str(gguf), "--format", "gguf",
                                "--outtype", outtype]) == 0
        report[outtype] = llama_cpp_figures(gguf, windows, prompt, args.threads)
        print(json.dumps({outtype: report[outtype]}), flush=True)
    (args.work_dir / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
