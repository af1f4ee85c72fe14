"""CaptionDecoder properties on a tiny decoder with the real 50,258-id vocabulary."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline import decoding
from pipeline.cost import cheaper_form, flops_per_sample, parallel_shared_flops
from pipeline.model import CaptionDecoder, DecoderConfig
from pipeline.objective import ParallelRows

V = 50258


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: with 2 OpenMP threads on 2 shared cores every op pays a barrier wait (measured 40x slower
    while other processes run), so these tests use one thread and restore the setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
TINY = dict(layers=2, width=64, heads=4, mlp_dim=128, encoder_width=48, parallel_len=9, tie_embeddings=False,
            image_pos_emb=False)
P, E = 10, 48


def tiny(seed=0, head_std=0.3, **kw):
    """A tiny decoder; a random (not zero) head so logits differ between tokens and rows."""
    torch.manual_seed(seed)
    m = CaptionDecoder(DecoderConfig(**{**TINY, **kw})).eval()
    if head_std:
        torch.nn.init.normal_(m.head.weight, std=head_std)
    with torch.no_grad():  # stronger image pathway, so different images give different captions
        for b in m.blocks:
            b.cross.out.weight.mul_(20)
    return m


def batch(b=4, l=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, P, E, generator=g)
    targets = torch.randint(0, 50000, (b, l), generator=g)
    mask = torch.ones(b, l, dtype=torch.bool)
    return feats, targets, mask


def test_first_loss_is_ln_v():
    torch.manual_seed(0)
    m = CaptionDecoder(DecoderConfig(**TINY))
    f, t, mk = batch()
    out = m.loss(f, t, mk, torch.tensor([True, False, True, False]))
    assert abs(out.loss.item() - math.log(V)) < 0.5
    assert abs(out.loss_ar.item() - math.log(V)) < 0.5 and abs(out.loss_par.item() - math.log(V)) < 0.5


@torch.no_grad()
def test_ar_rows_are_causal():
    m = tiny()
    f, t, mk = batch(b=2)
    ar = torch.zeros(2, dtype=torch.bool)
    a = m.logits(f, t, mk, ar)
    t2 = t.clone()
    t2[:, 4] = (t2[:, 4] + 1) % 50000
    b = m.logits(f, t2, mk, ar)
    # Position i sees inputs BOS, t0..t(i-1): changing t4 moves only positions 5, 6.
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


@torch.no_grad()
def test_parallel_logits_are_a_function_of_the_image_alone():
    """Two captions of different lengths for the same image, in batches holding other rows (AR and parallel,
    other lengths): identical parallel logits at every one of the Lp positions."""
    m = tiny()
    lp = m.parallel_len
    f, t, mk = batch(b=3, l=lp)
    mk[0, 3:] = False  # image 0 with a 3-token caption, beside an AR row and another parallel row
    a = m.logits(f, t, mk, torch.tensor([True, False, True]))[0]
    t2 = torch.randint(0, 50000, (1, lp))
    mk2 = torch.ones(1, lp, dtype=torch.bool)
    mk2[0, 8:] = False  # the same image alone, with an 8-token caption of other ids
    b = m.logits(f[:1], t2, mk2, torch.tensor([True]))[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    f4, t4, mk4 = batch(b=4, l=lp, seed=7)  # ... and inside a batch of other images, all parallel
    f4[2] = f[0]
    c = m.logits(f4, t4, mk4, torch.ones(4, dtype=torch.bool))[2]
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert (a[0] - a[1]).abs().max() > 1e-3  # positions differ (position embeddings): not one repeated row


@torch.no_grad()
def test_parallel_rows_attend_over_all_lp_positions():
    m = tiny()
    for b in m.blocks:  # a stronger self-attention pathway, so one key's change shows
        b.attn.out.weight.mul_(20)
    lp = m.parallel_len
    f, t, mk = batch(b=2, l=4)
    par, ar = torch.tensor([True, True]), torch.tensor([False, False])
    base_par, base_ar = m.logits(f, t, mk, par), m.logits(f, t, mk, ar)
    kick = torch.randn(m.cfg.width, generator=torch.Generator().manual_seed(0))  # not constant: LayerNorm
    m.pos_emb[lp - 1] += kick  # the last parallel position, beyond every caption here
    assert (m.logits(f, t, mk, par)[:, 0] - base_par[:, 0]).abs().max() > 1e-3  # bidirectional over all Lp
    torch.testing.assert_close(m.logits(f, t, mk, ar), base_ar)  # AR rows of length 4 never see position Lp-1
    m.pos_emb[lp - 1] -= kick
    m.pos_emb[lp] += kick  # past Lp: nothing changes
    torch.testing.assert_close(m.logits(f, t, mk, par), base_par)


@pytest.mark.parametrize("cross", ["kv", "absorbed"])
def test_shared_first_block_is_the_plain_all_mask_pass(cross):
    """The parallel path's shortcut (block 0's self-attention and queries once per batch) has the plain
    all-[MASK] pass's loss and gradients (float64: only rounding differs)."""
    torch.manual_seed(0)
    m = CaptionDecoder(DecoderConfig(**TINY)).double()
    torch.nn.init.normal_(m.head.weight, std=0.3)
    m.cross_attention = cross
    f, t, mk = batch(b=3, l=6)
    f = f.double()
    mk[1, 2:] = False
    par = torch.ones(3, dtype=torch.bool)
    m.zero_grad()
    out = m.loss(f, t, mk, par)
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    tt, mm = ParallelRows.fit(m, t, mk)
    h = m.hidden(torch.full_like(tt, m.cfg.mask_id), m.pass_memory(f, m.parallel_len))  # full attention
    ref = F.cross_entropy(m.head(h[mm]), tt[mm])
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    assert out.tokens_par.item() == int(mk.sum())
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast[n], p.grad, msg=n)


def test_parallel_len_default_and_bounds():
    old = {k: v for k, v in TINY.items() if k != "parallel_len"}  # a config.json from before parallel_len
    assert CaptionDecoder(DecoderConfig(**old)).parallel_len == 77  # = max_len
    with pytest.raises(ValueError, match="parallel_len"):
        CaptionDecoder(DecoderConfig(**{**TINY, "parallel_len": 78}))


@torch.no_grad()
def test_row_in_mixed_batch_equals_row_alone():
    m = tiny()
    f, t, mk = batch(b=4)
    mk[1, 5:] = False
    mk[2, 3:] = False
    par = torch.tensor([True, False, True, False])
    mixed = m.logits(f, t, mk, par)
    for i in range(4):
        alone = m.logits(f[i : i + 1], t[i : i + 1], mk[i : i + 1], par[i : i + 1])
        real = mk[i]
        torch.testing.assert_close(mixed[i, real], alone[0, real], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_padding_invariance():
    m = tiny()
    f, t, mk = batch(b=2, l=5)
    for mode in (True, False):
        par = torch.full((2,), mode)
        short = m.logits(f, t, mk, par)
        # Same rows padded to 11 with arbitrary ids in the padding (the padding is excluded by mask only).
        t_long = torch.cat([t, torch.randint(0, 50000, (2, 6))], 1)
        mk_long = torch.cat([mk, torch.zeros(2, 6, dtype=torch.bool)], 1)
        long = m.logits(f, t_long, mk_long, par)
        torch.testing.assert_close(long[:, :5], short, atol=1e-5, rtol=1e-5)


def test_loss_equals_cross_entropy_of_forward():
    m = tiny()
    f, t, mk = batch(b=4)
    mk[0, 4:] = False
    mk[3, 2:] = False
    par = torch.tensor([True, False, False, True])
    out = m.loss(f, t, mk, par)
    logits = m.logits(f, t, mk, par)
    ce = F.cross_entropy(logits.transpose(1, 2), t, reduction="none")  # [B, L]
    rows_par = par[:, None].expand_as(mk)
    torch.testing.assert_close(out.loss, ce[mk].mean())
    torch.testing.assert_close(out.loss_ar, ce[mk & ~rows_par].mean())
    torch.testing.assert_close(out.loss_par, ce[mk & rows_par].mean())
    assert out.tokens_ar.item() == int((mk & ~rows_par).sum())
    assert out.tokens_par.item() == int((mk & rows_par).sum())
    out.loss.backward()
    assert m.head.weight.grad.abs().sum() > 0


def test_loss_with_one_mode_absent_is_finite():
    m = tiny()
    f, t, mk = batch(b=2)
    out = m.loss(f, t, mk, torch.zeros(2, dtype=torch.bool))
    assert out.tokens_par.item() == 0 and out.loss_par.item() == 0.0
    assert torch.isfinite(out.loss)


@torch.no_grad()
def _reference_greedy(m, f, steps):
    """Greedy decoding through the training forward (AR rows), re-run on the full prefix each step."""
    seq = torch.zeros(f.shape[0], 0, dtype=torch.long)
    for _ in range(steps):
        t = torch.cat([seq, torch.zeros(f.shape[0], 1, dtype=torch.long)], 1)  # last target is a dummy
        logits = m.logits(f, t, torch.ones_like(t, dtype=torch.bool), torch.zeros(f.shape[0], dtype=torch.bool))
        logits[..., m.cfg.mask_id] = -math.inf
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def test_kv_cache_greedy_equals_no_cache_and_forward():
    m = tiny()
    f = batch(b=3)[0]
    cached = m.generate(f, max_new_tokens=10, use_cache=True)
    plain = m.generate(f, max_new_tokens=10, use_cache=False)
    assert cached.shape == (3, 10)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, _reference_greedy(m, f, 10))  # beam_size=1 is greedy
    assert len({tuple(r) for r in cached.tolist()}) > 1  # different images, different captions


# --- beam search on a 5-id vocabulary (3 words, EOS = BOS, [MASK]): every caption can be enumerated ------------
SMALL = dict(layers=2, width=32, heads=2, mlp_dim=64, vocab_size=5, max_len=8, encoder_width=16, mask_id=4,
             bos_id=3, eos_id=3, parallel_len=6, tie_embeddings=False, image_pos_emb=False)


def small(seed=0, head_std=1.5):
    torch.manual_seed(seed)
    m = CaptionDecoder(DecoderConfig(**SMALL)).eval()
    torch.nn.init.normal_(m.head.weight, std=head_std)  # peaked, image-dependent next-token distributions
    with torch.no_grad():
        for b in m.blocks:
            b.cross.out.weight.mul_(20)
    return m, torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(seed))


def every_caption(words: int, eos: int, max_new: int):
    """Every caption of at most max_new ids: EOS-terminated ones, and those that run to max_new without EOS."""
    import itertools

    out = []
    for n in range(max_new + 1):
        for body in itertools.product(range(words), repeat=n):
            if n < max_new:
                out.append([*body, eos])
            elif n == max_new:
                out.append(list(body))
    return out


@torch.no_grad()
def brute_force(m, f, max_new, alpha):
    """(scores [B, S] = summed log-prob / length**alpha under generation's distribution, captions)."""
    caps = every_caption(3, m.cfg.eos_id, max_new)
    n, L = len(caps), max_new
    t = torch.full((n, L), m.cfg.eos_id)
    mk = torch.zeros(n, L, dtype=torch.bool)
    for i, c in enumerate(caps):
        t[i, : len(c)] = torch.tensor(c)
        mk[i, : len(c)] = True
    out = []
    for img in range(f.shape[0]):
        logits = m.logits(f[img : img + 1].expand(n, -1, -1), t, mk, torch.zeros(n, dtype=torch.bool))
        logits[..., m.cfg.mask_id] = -math.inf  # as generation: [MASK] is never generated
        lp = (logits.log_softmax(-1).gather(-1, t[..., None])[..., 0] * mk).sum(1)
        out.append(lp / mk.sum(1).double() ** alpha)
    return torch.stack(out).float(), caps


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_beam_search_with_room_for_everything_is_the_brute_force_optimum(alpha):
    m, f = small()
    max_new = 4
    want, caps = brute_force(m, f, max_new, alpha)  # 121 captions per image
    # 2K >= every continuation of every prefix: nothing is pruned, so the pool is the exact top K.
    beams = decoding.beam_search(m, f, max_new_tokens=max_new, beam_size=64, length_penalty=alpha)
    top = want.topk(64, dim=1).values
    torch.testing.assert_close(beams.scores, top, atol=1e-5, rtol=1e-5)
    best = m.generate(f, max_new_tokens=max_new, beam_size=64, length_penalty=alpha)
    for i in range(f.shape[0]):
        c = caps[int(want[i].argmax())]
        assert best[i, : len(c)].tolist() == c and (best[i, len(c):] == m.cfg.eos_id).all()
    # A narrow beam never beats the optimum, and what it reports is the true score of what it returns.
    narrow = decoding.beam_search(m, f, max_new_tokens=max_new, beam_size=2, length_penalty=alpha)
    assert (narrow.scores[:, 0] <= want.max(1).values + 1e-5).all()
    for i in range(f.shape[0]):
        seq = narrow.sequences[i, 0, : int(narrow.lengths[i, 0])].tolist()
        torch.testing.assert_close(narrow.scores[i, 0], want[i, caps.index(seq)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_early_stop_never_changes_the_pool(alpha):
    """The stopping bound is exact: stopping early gives the pool that running to max_new_tokens gives."""
    for seed in range(3):
        m, f = small(seed, head_std=0.8)
        kw = dict(max_new_tokens=7, beam_size=3, length_penalty=alpha)
        a = decoding.beam_search(m, f, **kw)
        b = decoding.beam_search(m, f, **kw, early_stop=False)
        torch.testing.assert_close(a.scores, b.scores)
        assert torch.equal(a.sequences, b.sequences)


def test_beam_one_is_greedy_and_cache_changes_nothing():
    m, f = small(head_std=0.8)
    g = m.generate(f, max_new_tokens=7)
    assert torch.equal(m.generate(f, max_new_tokens=7, beam_size=1, length_penalty=2.0), g)
    # With no length penalty, a width-1 beam search (its pool and refill included) is greedy exactly.
    one = decoding.beam_search(m, f, max_new_tokens=7, beam_size=1, length_penalty=0.0).best()
    assert torch.equal(one, g[:, : one.shape[1]]) and (g[:, one.shape[1]:] == m.cfg.eos_id).all()
    big = tiny()
    fb = batch(b=2)[0]
    for alpha in (0.0, 1.0):
        a = decoding.beam_search(big, fb, max_new_tokens=8, beam_size=3, length_penalty=alpha, use_cache=True)
        b = decoding.beam_search(big, fb, max_new_tokens=8, beam_size=3, length_penalty=alpha, use_cache=False)
        assert torch.equal(a.sequences, b.sequences)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)


def fixed_steps(m, table):
    """Make the head emit log(table[step]) whatever the input: next-token probabilities by step alone."""
    calls = [0]

    def hook(mod, inp, out):
        p = torch.tensor(table[min(calls[0], len(table) - 1)]).log()
        calls[0] += 1
        return p.expand_as(out).clone()

    return m.head.register_forward_hook(hook)


def test_short_finished_beam_is_pushed_out_by_longer_better_ones():
    m, f = small()
    # ids 0, 1, 2 = words, 3 = EOS, 4 = [MASK] (never generated). Step 0: EOS likeliest; then EOS at 0.98.
    table = [[0.35, 0.24, 0.01, 0.4, 0.0], [0.01, 0.005, 0.005, 0.98, 0.0]]
    hook = fixed_steps(m, table)
    beams = decoding.beam_search(m, f[:1], max_new_tokens=6, beam_size=2, length_penalty=1.0)
    hook.remove()
    # "EOS" (log 0.4 / 1 = -0.92) finished first, then "w0 EOS" (-0.54) and "w1 EOS" (-0.72) outranked it.
    assert beams.sequences[0, :, :2].tolist() == [[0, 3], [1, 3]] and beams.lengths[0].tolist() == [2, 2]
    want = [(math.log(0.35) + math.log(0.98)) / 2, (math.log(0.24) + math.log(0.98)) / 2]
    torch.testing.assert_close(beams.scores[0], torch.tensor(want))
    fixed_steps(m, table)  # step counter from 0 again
    # Without a length penalty the summed log-prob wins: "EOS" alone (-0.92 vs -1.07).
    assert m.generate(f[:1], max_new_tokens=6, beam_size=2, length_penalty=0.0).tolist() == [[3]]


def test_generate_stops_at_eos():
    m = tiny()
    eos = m.cfg.eos_id

    def eos_first(mod, inp, out):  # a model that always prefers EOS: generation must end at once
        out[..., eos] += 100.0
        return out

    m.head.register_forward_hook(eos_first)
    f = batch(b=2)[0]
    out = m.generate(f, max_new_tokens=10)
    assert out.shape == (2, 1) and (out == eos).all()
    # Beam search: the EOS-first caption wins and nothing longer can beat it, so the search stops early.
    out = m.generate(f, max_new_tokens=10, beam_size=3, length_penalty=0.0)
    assert out.shape == (2, 1) and (out == eos).all()


def test_parallel_decode_is_one_pass_cut_at_eos():
    m = tiny()
    f = batch(b=3)[0]
    eos, mask_id, lp = m.cfg.eos_id, m.cfg.mask_id, m.parallel_len
    passes = [0]
    m.blocks[0].register_forward_hook(lambda *a: passes.__setitem__(0, passes[0] + 1))
    a = m.parallel_decode(f)
    assert passes[0] == 1  # one decoder pass for the whole batch: no length search
    assert a.dtype == torch.long and a.shape[0] == 3 and 1 <= a.shape[1] <= lp and not (a == mask_id).any()
    # The argmax of the parallel logits, cut at each row's first EOS.
    logits = m.logits(f, torch.zeros(3, lp, dtype=torch.long), torch.ones(3, lp, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    logits[..., mask_id] = -math.inf
    assert torch.equal(a, decoding.cut_at_eos(logits.argmax(-1), eos))
    passes[0] = 0
    r = m.parallel_decode(f, refine_steps=2)
    assert passes[0] == 3 and r.shape[0] == 3 and r.shape[1] <= lp and not (r == mask_id).any()
    cut = decoding.cut_at_eos(torch.tensor([[5, eos, 7, eos], [5, 6, 7, 8], [eos, 1, 2, 3]]), eos)
    assert cut.tolist() == [[5, eos, eos, eos], [5, 6, 7, 8], [eos, eos, eos, eos]]
    assert decoding.cut_at_eos(torch.tensor([[5, eos, 7], [eos, 1, 2]]), eos).tolist() == [[5, eos], [eos, eos]]


def test_score_groups_candidates_per_image():
    m = tiny()
    f, t, mk = batch(b=2, l=6)
    mk[1, 3:] = False
    cands = torch.cat([t, t.flip(0)], 0)[[0, 2, 1, 3]]  # image 0: t0, t1; image 1: t1, t0
    cmask = torch.cat([mk, mk.flip(0)], 0)[[0, 2, 1, 3]]
    grouped = m.score(f, cands, cmask)  # [4], two candidates per image, image K/V shared
    expanded = m.score(f.repeat_interleave(2, 0), cands, cmask)
    torch.testing.assert_close(grouped, expanded, atol=1e-4, rtol=1e-5)
    logits = m.logits(f, t, mk, torch.zeros(2, dtype=torch.bool))
    direct = (logits.log_softmax(-1).gather(-1, t[..., None])[..., 0] * mk).sum(1)
    torch.testing.assert_close(grouped[[0, 2]], direct, atol=1e-4, rtol=1e-5)


def test_overfit_then_generate_and_score():
    """Tiny model memorises 4 captions: greedy, beam and parallel decoding recover them; score ranks them."""
    from pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2")
    caps = ["a red circle", "two blue squares at the bottom", "a small green triangle on the left", "one yellow star"]
    targets, mask = tok.encode_batch(caps)
    torch.manual_seed(0)
    m = CaptionDecoder(DecoderConfig(**TINY))
    f = torch.randn(4, P, E)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0, fused=True)  # fused: 6x faster on CPU
    for step in range(120):
        par = (torch.arange(4) + step) % 2 == 0  # every row trains both modes
        out = m.loss(f, targets, mask, par)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    m.eval()
    assert out.loss.item() < 0.2
    for k in (1, 2):
        assert tok.decode_batch(m.generate(f, max_new_tokens=12, beam_size=k)) == caps
    g = m.generate(f, max_new_tokens=12)
    assert g.shape[1] == mask.sum(1).max()  # stopped when the longest caption's EOS came out
    assert torch.equal(g, targets)  # shorter rows padded with EOS after their own EOS
    assert tok.decode_batch(m.parallel_decode(f)) == caps  # one pass at Lp: the model places EOS itself
    # Zero-shot: every image ranks its own caption first among all four.
    cands = targets.repeat(4, 1)
    s = m.score(f, cands, mask.repeat(4, 1)).view(4, 4)
    assert torch.equal(s.argmax(1), torch.arange(4))


def test_flops_formula_matches_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for enc, cross in ((48, "kv"), (64, "kv"), (48, "absorbed"), (64, "absorbed")):  # with/without projection
        m = CaptionDecoder(DecoderConfig(**{**TINY, "encoder_width": enc}))  # Lp = 9
        m.cross_attention = cross
        f, t, mk = torch.randn(3, P, enc), torch.randint(0, 50000, (3, 7)), torch.ones(3, 7, dtype=torch.bool)
        par = torch.tensor([True, False, True])  # one AR row of 7, two parallel rows of Lp sharing block 0's start
        want = {k: flops_per_sample(m.cfg, 7, P, cross)[k] + 2 * flops_per_sample(m.cfg, 7, P, cross, parallel=True)[k]
                + parallel_shared_flops(m.cfg, cross)[k] for k in ("forward", "train")}
        # The math backend runs attention as matmuls the counter sees (the CPU flash kernel is uncounted).
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            m.logits(f, t, mk, par)
        assert fc.get_total_flops() == want["forward"], cross
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            m.loss(f, t, mk, par).loss.backward()
        assert fc.get_total_flops() == want["train"], cross


@pytest.mark.parametrize("enc", [48, 64])
def test_absorbed_cross_attention_equals_kv_path(enc):
    """The absorbed K/V form is the same function with the same gradients (float64, so only rounding differs)."""
    torch.manual_seed(0)
    m = CaptionDecoder(DecoderConfig(**{**TINY, "encoder_width": enc})).double()
    torch.nn.init.normal_(m.head.weight, std=0.3)
    f, t, mk = batch(b=3)
    f = f[..., :enc].double() if enc <= E else torch.randn(3, P, enc, dtype=torch.float64)
    mk[1, 4:] = False
    par = torch.tensor([True, False, True])
    out, grads = {}, {}
    for cross in ("kv", "absorbed"):
        m.cross_attention = cross
        m.zero_grad()
        loss = m.loss(f, t, mk, par).loss
        loss.backward()
        out[cross] = (m.logits(f, t, mk, par), loss)
        grads[cross] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out["kv"][0], out["absorbed"][0])
    torch.testing.assert_close(out["kv"][1], out["absorbed"][1])
    assert grads["kv"].keys() == grads["absorbed"].keys() and any("cross.kv" in n for n in grads["kv"])
    for n in grads["kv"]:
        torch.testing.assert_close(grads["kv"][n], grads["absorbed"][n], msg=n)


def test_auto_cross_attention_choice():
    cfg = DecoderConfig()  # the seed's sizes: absorbed for short captions only
    form = cheaper_form
    assert form(cfg, 20, 197) == "absorbed" and form(cfg, 40, 197) == "kv" and form(cfg, 20, 16) == "kv"


@pytest.mark.parametrize("cross", ["kv", "absorbed"])
def test_bf16_autocast_matches_fp32(cross):
    m = tiny()
    m.cross_attention = cross
    f, t, mk = batch(b=2, l=5)
    par = torch.tensor([True, False])
    ref = m.loss(f, t, mk, par).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m.loss(f, t, mk, par).loss
        ids = m.generate(f, max_new_tokens=4)
    assert low.dtype == torch.float32 and abs(low.item() - ref.item()) < 0.05 * ref.item()
    assert ids.shape[0] == 2


def test_tied_embeddings_share_one_matrix_and_survive_a_checkpoint(tmp_path):
    from pipeline import checkpoint
    from pipeline.training import make_optimizer

    cfg = DecoderConfig(layers=1, width=32, heads=4, mlp_dim=64, vocab_size=50, max_len=8, encoder_width=16,
                        mask_id=49, bos_id=48, eos_id=48, parallel_len=6, tie_embeddings=True,
                        image_pos_emb=False)
    torch.manual_seed(0)
    m = CaptionDecoder(cfg)
    assert m.head.weight is m.tok_emb.weight and m.head.weight.abs().sum() > 0  # not zeroed: it is the embedding
    untied = CaptionDecoder(DecoderConfig(**{**cfg.__dict__, "tie_embeddings": False}))
    assert m.num_parameters() == untied.num_parameters() - 50 * 32
    opt = make_optimizer(m, lr=1e-3, weight_decay=0.1)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_parameters()
    f = torch.randn(2, 5, 16)
    t = torch.randint(0, 48, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    m.loss(f, t, mask, torch.tensor([True, False])).loss.backward()
    opt.step()
    checkpoint.save(tmp_path / "ck", model=m, optimizer=opt, scheduler=None, step=1, epoch=0, batch=1)
    back = CaptionDecoder(cfg)
    back.load_state_dict(checkpoint.load_weights(tmp_path / "ck"))
    assert back.head.weight is back.tok_emb.weight and torch.equal(back.head.weight, m.head.weight)


@torch.no_grad()
def test_image_position_embedding_tells_the_decoder_where_a_token_sits():
    """Cross-attention alone is blind to the image tokens' order: permuting them changes nothing. With the
    learned image position embedding it does, and a wrong token count is refused."""
    f, t, mk = batch(b=2)
    perm = torch.randperm(P, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([True, False])
    for cross in ("kv", "absorbed"):
        plain = tiny()
        plain.cross_attention = cross
        torch.testing.assert_close(plain.logits(f[:, perm], t, mk, rows), plain.logits(f, t, mk, rows))
        placed = tiny(image_pos_emb=True, image_tokens=P)
        placed.cross_attention = cross
        assert (placed.logits(f[:, perm], t, mk, rows) - placed.logits(f, t, mk, rows)).abs().max() > 1e-3
        torch.testing.assert_close(placed.generate(f, max_new_tokens=3), placed.generate(f, max_new_tokens=3))
    with pytest.raises(ValueError, match="image tokens"):
        tiny(image_pos_emb=True, image_tokens=P + 1).logits(f, t, mk, rows)
