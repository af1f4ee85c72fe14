"""The text-only n-gram baseline: a proper distribution, counted exactly, scored as the decoder is."""

from __future__ import annotations

import math

import pytest

from pipeline.ngram import NGramLM, fit_baseline

EOS, BOS, V = 9, 9, 10


def test_probabilities_sum_to_one_in_seen_and_unseen_contexts():
    lm = NGramLM(3, V, BOS, EOS).fit([[1, 2, 3, EOS], [1, 2, 4, EOS], [5, EOS]])
    for hist in [(BOS, BOS), (BOS, 1), (1, 2), (2, 3), (7, 7), (5, 1)]:
        assert sum(lm.prob(hist, t) for t in range(V)) == pytest.approx(1.0, abs=1e-12), hist
        assert all(lm.prob(hist, t) > 0 for t in range(V))


def test_a_deterministic_corpus_is_learnt_and_decoded():
    seq = [1, 2, 3, 4, EOS]
    lm = NGramLM(3, V, BOS, EOS).fit([seq] * 50)
    assert lm.most_likely(10) == seq
    s, n = lm.nll([seq])
    assert n == len(seq)
    assert s / n < 0.05  # nearly certain of every token
    assert lm.loss([[4, 3, 2, 1, EOS]]) > 1.0  # an unseen order costs


def test_higher_order_helps_and_counts_match_by_hand():
    lm1 = NGramLM(1, V, BOS, EOS, discount=0.5).fit([[1, 1, 2, EOS]])
    # unigram: counts 1:2, 2:1, EOS:1 over 4 tokens, 3 distinct: P(1) = (2-0.5 + 0.5*3/V) / 4
    assert lm1.prob((), 1) == pytest.approx((1.5 + 1.5 / V) / 4)
    corpus = [[1, 2, 3, EOS], [4, 2, 5, EOS]] * 20
    held = [[1, 2, 3, EOS], [4, 2, 5, EOS]]
    l1, l2, l3 = (NGramLM(o, V, BOS, EOS).fit(corpus).loss(held) for o in (1, 2, 3))
    assert l1 > l2 > l3


def test_fit_baseline_on_real_tokenizer_and_synthetic_captions():
    from pipeline import synthetic
    from pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2")
    caps = [r.caption for r in synthetic.make_rows(0, 400, 0.0)]
    ids = tok.encode_ids(caps, 77)
    b2 = fit_baseline(tok, ids[:350], ids[350:], 77, order=2)
    b3 = fit_baseline(tok, ids[:350], ids[350:], 77, order=3)
    assert b3["val_tokens"] == sum(len(tok.encode(c, 77)) for c in caps[350:])  # caption tokens + EOS
    assert 0.5 < b3["val_loss"] < b2["val_loss"] < math.log(tok.vocab_size)
    words = set(" ".join(caps[:350]).replace(",", " ").split())
    assert len(b3["caption"].split()) >= 3 and set(b3["caption"].replace(",", " ").split()) <= words
