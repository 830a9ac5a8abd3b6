"""A Hugging Face tokenizer for a GGUF's SentencePiece ("llama") vocabulary, built from the GGUF's own metadata.

GGUF files converted from SentencePiece BPE models (Gemma, LLaMA 2, ...) store the vocabulary as pieces with
scores and token types but no merge list. llama.cpp tokenizes them the SentencePiece way: the text's spaces
become "▁", user-defined pieces (Gemma: "\\n", runs of spaces and tabs, HTML tags) and, when special tokens are
parsed, control pieces are cut out first, then each remaining fragment starts as single characters and the
adjacent pair whose concatenation is the piece with the highest score is merged, again and again; characters
left outside the vocabulary become their UTF-8 bytes ("<0x..>" pieces).

transformers 5.6 reads such a vocabulary as a Unigram model, which tokenizes Gemma 3 into fragments ("▁c",
"ap", "it", "al" for " capital"). The same algorithm as llama.cpp's is a BPE whose merge ranks follow the
score of the merged piece: every split of a normal piece into two normal pieces is a merge, ranked by the
piece's score. (SentencePiece breaks ties between equal scores by position, a merge list by rank; Gemma's
normal pieces all have distinct scores, and the splits of one piece only compete in contrived strings.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"


@dataclass(frozen=True)
class SpmVocab:
    """The tokenizer part of a GGUF with ``tokenizer.ggml.model == "llama"``."""

    tokens: Sequence[str]
    scores: Sequence[float]
    token_types: Sequence[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool


def _field(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    field = fields.get(key)
    return default if field is None else field.contents()


def read_spm_vocab(reader: Any) -> SpmVocab:
    """Read the SentencePiece vocabulary of a ``gguf.GGUFReader``."""
    fields = reader.fields
    return SpmVocab(
        tokens=_field(fields, "tokenizer.ggml.tokens"),
        scores=_field(fields, "tokenizer.ggml.scores"),
        token_types=_field(fields, "tokenizer.ggml.token_type"),
        bos_id=_field(fields, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(fields, "tokenizer.ggml.eos_token_id"),
        unk_id=_field(fields, "tokenizer.ggml.unknown_token_id"),
        pad_id=_field(fields, "tokenizer.ggml.padding_token_id"),
        # llama.cpp's defaults for an SPM vocabulary when the GGUF does not say.
        add_bos=bool(_field(fields, "tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(_field(fields, "tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(_field(fields, "tokenizer.ggml.add_space_prefix", True)),
    )


def is_spm_without_merges(reader: Any) -> bool:
    fields = reader.fields
    return _field(fields, "tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in fields


def score_ranked_merges(vocab: SpmVocab) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best-scored merged piece first."""
    normal = {token for token, kind in zip(vocab.tokens, vocab.token_types) if kind == NORMAL}
    ranked = []
    for token, score, kind in zip(vocab.tokens, vocab.scores, vocab.token_types):
        if kind != NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-score, left, right))
    ranked.sort(key=lambda merge: merge[0])  # stable: splits of one piece keep left-to-right order
    return [(left, right) for _, left, right in ranked]


def build_spm_tokenizer(vocab: SpmVocab) -> PreTrainedTokenizerFast:
    """A ``transformers`` fast tokenizer that tokenizes like llama.cpp does with ``vocab``."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    def token(token_id: int | None) -> str | None:
        return vocab.tokens[token_id] if token_id is not None and 0 <= token_id < len(vocab.tokens) else None

    unk = token(vocab.unk_id)
    model = BPE(
        vocab={piece: index for index, piece in enumerate(vocab.tokens)},
        merges=score_ranked_merges(vocab),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Tokenizer(model)
    # Metaspace without splitting turns spaces into "▁"; with add_space_prefix it puts one "▁" in front of the
    # text, SentencePiece's dummy prefix. (llama.cpp also puts one after every special or user-defined piece and
    # before text that already starts with a space; Gemma has no prefix, where the two agree.)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="first" if vocab.add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    # llama.cpp cuts user-defined pieces out of the raw text before tokenizing the rest (their spaces are
    # stored as spaces, not "▁"); control pieces only when special tokens are parsed, as transformers does.
    pieces = list(zip(vocab.tokens, vocab.token_types))
    backend.add_tokens([AddedToken(piece, normalized=False) for piece, kind in pieces if kind == USER_DEFINED])
    special = [piece for piece, kind in pieces if kind in (CONTROL, UNKNOWN, UNUSED)]
    backend.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in special])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token(vocab.bos_id),
        eos_token=token(vocab.eos_id),
        unk_token=unk,
        pad_token=token(vocab.pad_id),
        add_bos_token=vocab.add_bos,
        add_eos_token=vocab.add_eos,
    )
