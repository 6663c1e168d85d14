"""
    python -m pytest -q tests/test_attention_distill.py

Attention capture against eager attention, the losses against brute force, layer matching.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import attention_distill as ad
from conftest import tiny_ids, tiny_vlm


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("padded", [True, False])  # unpadded: SDPA runs with no mask, is_causal=True
def test_capture_equals_eager_attention(arch, padded):
    m = tiny_vlm(arch, layers=3, hidden=32, heads=4, kv_heads=2)  # GQA: 2 query heads per kv head
    ids, mask = tiny_ids()
    if not padded:
        mask = torch.ones_like(mask)
    emb = m.embed(ids, torch.randn(2, 4, 32))
    # rows: all positions; cols: each sample's image positions (sample 2 has none: any 4 positions)
    cols = torch.tensor([[2, 3, 4, 5], [1, 2, 3, 4], [0, 1, 2, 3]])
    rows = torch.arange(10).expand(3, 10)
    with ad.capture_attention(m.llm, [0, 2], rows, cols) as maps:
        h_capture = m.llm.base_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    assert sorted(maps) == [0, 2]

    m.llm.set_attn_implementation("sdpa")
    h_sdpa = m.llm.base_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    assert torch.equal(h_capture, h_sdpa)  # capture changes nothing in the forward

    m.llm.set_attn_implementation("eager")
    out = m.llm.base_model(inputs_embeds=emb, attention_mask=mask, output_attentions=True)
    for layer in [0, 2]:
        eager = out.attentions[layer].mean(1)  # (B, T, T), head-averaged
        want = torch.stack([eager[b][:, cols[b]] for b in range(3)])
        real = mask.bool()[:, :, None]  # eager gives padded query rows garbage; compare real rows
        torch.testing.assert_close(maps[layer] * real, want * real, atol=1e-6, rtol=1e-5)
        assert maps[layer][0, 1].sum() == 0  # a query before the image sees none of it (causal)
        assert maps[layer][0, 9].sum() < 1  # softmax over all visible keys, not renormalised on the image


def test_capture_needs_our_attention_and_real_layers():
    m = tiny_vlm(layers=2)
    rows = cols = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="layers \\[5\\] do not exist"):
        with ad.capture_attention(m.llm, [5], rows, cols):
            pass
    m.llm.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="attn_implementation"):
        with ad.capture_attention(m.llm, [0], rows, cols):
            pass


# -- KD ------------------------------------------------------------------------------------------

def test_kd_loss_matches_kl_div_reference():
    """Rows are the positions that predict an answer token (TeacherStudent selects them; tests/test_model.py checks
    the shift); the teacher's embedding is padded to 13 rows, the tokenizer's vocabulary is 11."""
    torch.manual_seed(0)
    s, t = torch.randn(5, 12), torch.randn(5, 13)
    tau = 2.0
    terms = [F.kl_div(F.log_softmax(s[i, :11] / tau, -1), F.softmax(t[i, :11] / tau, -1), reduction="sum")
             for i in range(5)]
    want = torch.stack(terms).mean() * tau ** 2
    torch.testing.assert_close(ad.kd_loss(s, t, tau, vocab_size=11), want)
    # without vocab_size: the smaller of the two (here the student's 12 rows)
    terms12 = [F.kl_div(F.log_softmax(s[i] / tau, -1), F.softmax(t[i, :12] / tau, -1), reduction="sum")
               for i in range(5)]
    torch.testing.assert_close(ad.kd_loss(s, t, tau), torch.stack(terms12).mean() * tau ** 2)
    assert float(ad.kd_loss(t, t)) == pytest.approx(0, abs=1e-6)


# -- VAT -----------------------------------------------------------------------------------------

def _vat_reference_loop(A_s, A_t, sample_mask):
    """The reference code's form (vat_queries=image, vat_pool=column), written as plain loops."""
    L, B, Nq, Nk = A_s.shape
    total = 0.0
    for l in range(L):
        losses = []
        for b in range(B):
            if not sample_mask[b]:
                continue
            s, t = A_s[l, b], A_t[l, b]
            thr_s = s.mean() + s.std()
            thr_t = t.mean() + t.std()
            p_s, p_t = [], []
            for c in range(Nk):
                num_s = num_t = 0.0
                n = 0
                for r in range(Nq):
                    if s[r, c] <= thr_s and t[r, c] <= thr_t and t[r, c] != 0:
                        num_s += float(s[r, c])
                        num_t += float(t[r, c])
                        n += 1
                p_s.append(num_s / max(1, n))
                p_t.append(num_t / max(1, n))
            dot = sum(a * b for a, b in zip(p_s, p_t))
            norm = math.sqrt(sum(a * a for a in p_s)) * math.sqrt(sum(b * b for b in p_t))
            losses.append(1 - dot / norm)
        total += sum(losses) / len(losses)
    return total


def _causal_maps(L, B, N, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(L, B, N, N, generator=g) ** 3
    A = A * torch.tril(torch.ones(N, N))  # image-to-image block of a causal LM: upper triangle is 0
    return A / A.sum(-1, keepdim=True) * 0.6  # rows sum to < 1: the rest goes to text keys


def test_vat_reference_form_equals_loop():
    A_s, A_t = _causal_maps(3, 4, 6, 0), _causal_maps(3, 4, 6, 1)
    mask = torch.tensor([True, False, True, True])
    got = ad.vat_loss(A_s, A_t, sample_mask=mask)
    want = _vat_reference_loop(A_s, A_t, mask)
    assert abs(float(got) - want) < 1e-5
    # sample 1 is excluded: changing it changes nothing
    A_s2 = A_s.clone()
    A_s2[:, 1] = torch.rand(3, 6, 6)
    assert float(ad.vat_loss(A_s2, A_t, sample_mask=mask)) == pytest.approx(float(got), abs=1e-7)
    # the paper's layer average is the sum / L
    assert float(ad.vat_loss(A_s, A_t, sample_mask=mask, layer_reduce="mean")) == pytest.approx(want / 3, abs=1e-6)


def test_vat_identical_maps_zero_and_scale_invariance():
    A_s, A_t = _causal_maps(2, 3, 5, 2), _causal_maps(2, 3, 5, 3)
    for pool in ["column", "flat"]:
        assert float(ad.vat_loss(A_t, A_t, pool=pool)) == pytest.approx(0.0, abs=1e-6)
        for loss in ["mse", "kl"]:
            assert float(ad.vat_loss(A_t, A_t, pool=pool, loss=loss)) == pytest.approx(0.0, abs=1e-6)
        base = float(ad.vat_loss(A_s, A_t, pool=pool))
        assert base > 0.01
        # thresholds scale with the map, so the kept set and the cosine do not change
        assert float(ad.vat_loss(A_s * 7.0, A_t, pool=pool)) == pytest.approx(base, abs=1e-5)
    # MSE is not scale-invariant
    assert float(ad.vat_loss(A_s * 7.0, A_t, loss="mse")) != pytest.approx(float(ad.vat_loss(A_s, A_t, loss="mse")))


def test_vat_flat_form_is_the_flattened_cosine():
    A_s, A_t = _causal_maps(2, 3, 5, 4), _causal_maps(2, 3, 5, 5)
    got = ad.vat_loss(A_s, A_t, pool="flat", filter_outliers=False)
    want = sum((1 - F.cosine_similarity(A_s[l].flatten(1), A_t[l].flatten(1), dim=1)).mean() for l in range(2))
    torch.testing.assert_close(got, want)


def test_vat_positions_are_each_samples_own_image_and_the_rows_that_count():
    is_img = torch.zeros(3, 10, dtype=torch.bool)
    is_img[0, 2:6], is_img[1, 1:5] = True, True  # the last sample is text-only
    mask = (torch.arange(10)[None] < torch.tensor([10, 8, 7])[:, None]).long()
    rows, cols, row_mask = ad.vat_positions(is_img, mask, "image", 4)
    assert cols[:2].tolist() == [[2, 3, 4, 5], [1, 2, 3, 4]] and rows is cols and row_mask is None
    rows, cols, row_mask = ad.vat_positions(is_img, mask, "all", 4)
    assert rows.tolist() == [list(range(10))] * 3 and torch.equal(row_mask, mask.bool())
    _, _, row_mask = ad.vat_positions(is_img, mask, "text", 4)
    assert torch.equal(row_mask, mask.bool() & ~is_img)


def test_vat_settings_refuse_what_they_do_not_know():
    assert ad.VATSettings().loss_kwargs() == dict(pool="flat", loss="cosine", filter_outliers=False, layer_reduce="sum")
    assert ad.VATSettings(vat_pool="column").loss_kwargs()["filter_outliers"]  # the reference form's outlier filter
    with pytest.raises(ValueError, match="unknown vat_pool 'rows': use column, flat"):
        ad.VATSettings(vat_pool="rows")
    with pytest.raises(ValueError, match="unknown matching 'best': use group, simple, adaptive"):
        ad.VATSettings(matching="best")


# -- matching ------------------------------------------------------------------------------------

def test_match_layers_gives_the_pairs_training_and_alignment_use():
    ref = ad.match_layers(24, 40)  # the reference code's pair of sizes: its layer table
    assert ref.student == list(range(8, 15)) and ref.teacher == list(range(13, 24))
    assert ref.windows == ad.group_matching(ref.student, ref.teacher) and ref.captured == list(range(13, 24))
    simple = ad.match_layers(4, 6, [1, 2], [2, 3, 4], "simple")
    assert simple.windows == [[2], [3]] and simple.captured == [2, 3] and simple.teacher == [2, 3, 4]
    assert ad.match_layers(4, 6, [1, 2], [2, 3, 4], "adaptive").windows == [[2, 3], [3, 4]]  # it picks inside these
    assert simple.note("simple") == dict(student_layers=[1, 2], teacher_layers=[2, 3, 4], matching="simple")


def test_group_matching_reference_table():
    windows = ad.group_matching(list(range(8, 15)), list(range(13, 24)))
    assert windows == [list(range(13 + j, 18 + j)) for j in range(7)]
    assert windows[0] == [13, 14, 15, 16, 17] and windows[-1] == [19, 20, 21, 22, 23]


def test_simple_matching_paper_example():
    teacher = list(range(100, 110))
    assert ad.simple_matching(list(range(5)), teacher) == [100, 102, 104, 106, 108]


def test_adaptive_matching_picks_most_similar_in_window():
    torch.manual_seed(0)
    s = torch.rand(2, 3, 4, 4)
    t = {l: torch.rand(3, 4, 4) for l in range(5)}
    t[3] = s[0] * 2 + 0.001  # nearly parallel to student map 0, but only window 0 holds layer 3
    t[1] = s[1].clone()      # identical to student map 1, in window 1
    windows = [[2, 3, 4], [0, 1, 2]]
    assert ad.adaptive_matching(s, t, windows) == [3, 1]


def test_layer_presets_and_ranges():
    assert ad.resolve_layers(None, 24) == list(range(8, 15))
    assert ad.resolve_layers("intermediate", 24) == list(range(8, 15))
    assert ad.resolve_layers("intermediate", 40) == list(range(13, 24))
    assert ad.resolve_layers("early", 10) == [0, 1, 2, 3]
    assert ad.resolve_layers("late", 10) == [6, 7, 8, 9]
    assert ad.resolve_layers((0.5, 1.0), 4) == [2, 3]
    assert ad.resolve_layers([1, 3], 4) == [1, 3]
    with pytest.raises(ValueError):
        ad.resolve_layers([4], 4)


@pytest.mark.parametrize("rows_per_chunk", [256, 3])  # one chunk, or the 4 query rows in chunks of 3 and 1
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_attention_probs_gradients_match_plain_autograd(mask_kind, rows_per_chunk, monkeypatch):
    monkeypatch.setattr(ad, "ROWS_PER_CHUNK", rows_per_chunk)
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 7, 3
    q = torch.randn(B, H, T, D, dtype=torch.double, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, dtype=torch.double, requires_grad=True)
    rows, cols = torch.tensor([[1, 3, 4, 6], [0, 2, 5, 6]]), torch.tensor([[2, 3, 4], [0, 1, 2]])
    lengths = torch.tensor([7, 5])
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]
    allowed = causal[None] & (torch.arange(T)[None, None, :] < lengths[:, None, None])
    mask = {"none": None, "bool": allowed[:, None],
            "float": torch.zeros(B, 1, T, T, dtype=torch.double).masked_fill(~allowed[:, None], -1e9)}[mask_kind]
    torch.autograd.gradcheck(lambda q, k: ad.attention_probs(q, k, mask, rows, cols), (q, k))
    # and against the softmax-then-slice definition
    s = torch.einsum("bhqd,bhsd->bhqs", q, k.repeat_interleave(H // Hkv, 1)) / math.sqrt(D)
    if mask_kind != "none":
        s = s.masked_fill(~allowed[:, None], float("-inf"))
    else:
        s = s.masked_fill(~causal, float("-inf"))
    p = s.softmax(-1).nan_to_num(0.0)
    want = torch.stack([p[b][:, rows[b]][:, :, cols[b]] for b in range(B)]).mean(1)
    torch.testing.assert_close(ad.attention_probs(q, k, mask, rows, cols), want)


def test_attention_probs_are_float32_under_bf16_autocast():
    """Under bf16 autocast the probabilities (forward and the recomputing backward) stay float32: the same numbers
    as outside autocast, so the forward and the backward see one softmax."""
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 9, 8
    q = torch.randn(B, H, T, D).bfloat16()
    k = torch.randn(B, Hkv, T, D).bfloat16()
    rows, cols = torch.tensor([[3, 5, 8], [4, 6, 7]]), torch.tensor([[0, 1, 2], [1, 2, 3]])

    def run(autocast):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            p = ad.attention_probs(qq, kk, None, rows, cols)
        (p * torch.arange(p.numel()).view_as(p)).sum().backward()
        return p, qq.grad, kk.grad

    (p0, dq0, dk0), (p1, dq1, dk1) = run(False), run(True)
    assert p1.dtype == torch.float32
    assert torch.equal(p0, p1) and torch.equal(dq0, dq1) and torch.equal(dk0, dk1)


def test_adaptive_matching_ignores_text_only_samples():
    # Sample 1 is text-only (its "image columns" are arbitrary positions): it must not decide the match.
    torch.manual_seed(0)
    s = torch.rand(1, 2, 4, 4)
    t = {0: s[0].clone(), 1: s[0].clone()}
    t[0][0] = s[0, 0] + 0.5 * torch.rand(4, 4)  # layer 1 matches the image sample exactly ...
    t[0][1] = s[0, 1]
    t[1][1] = torch.rand(4, 4) * 10  # ... layer 0 only the text-only sample
    assert ad.adaptive_matching(s, t, [[0, 1]], sample_mask=torch.tensor([True, False])) == [1]
    assert ad.adaptive_matching(s[:, :1], {l: m[:1] for l, m in t.items()}, [[0, 1]]) == [1]


# -- the capture's arithmetic: against the softmax definition, and bit for bit against the code before its speed-ups --

def _reference_probs(q, k, allowed, rows, cols, scaling):
    """The definition, written plainly: softmax(q k^T * scaling) over all keys with the mask, per head, the heads
    averaged, then each sample's rows and image columns; a query that sees nothing gives 0."""
    H = q.shape[1]
    s = torch.einsum("bhqd,bhsd->bhqs", q, k.repeat_interleave(H // k.shape[1], 1)) * scaling
    p = s.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)
    return torch.stack([p[b][rows[b]][:, cols[b]] for b in range(q.shape[0])])


def _qk_batch(dtype=torch.float32):
    """GQA (8 query heads on 2 kv heads), right padding (one sample with its image past the padding start), q laid
    out as transformers leaves it (a transpose of (B, T, H, D))."""
    torch.manual_seed(0)
    B, H, Hkv, T, D = 3, 8, 2, 23, 16
    q = torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, T, D, dtype=dtype)
    lengths = torch.tensor([23, 17, 12])
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]
    allowed = causal[None] & (torch.arange(T)[None, None, :] < lengths[:, None, None])
    cols = torch.tensor([[2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6], [9, 10, 11, 12, 13, 14]])
    return q, k, allowed, cols


def _probs_and_grads(fn, q, k, weight):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    p = fn(q, k)
    (p * weight).sum().backward()
    return p.detach(), q.grad, k.grad


@pytest.mark.parametrize("rows_per_chunk", [256, 5])  # one chunk, or chunks of 5 query rows
@pytest.mark.parametrize("mask_kind", ["none", "bool"])  # none: SDPA's is_causal=True (no padding then)
@pytest.mark.parametrize("form", ["all", "image"])  # rows: every position (paper form) or the image tokens
def test_attention_probs_match_the_softmax_definition(form, mask_kind, rows_per_chunk, monkeypatch):
    """Maps and q / k gradients in float32 against the definition. Neither is bitwise the float32 definition's (the
    grouped einsum, and backward's own formula for the softmax gradient, sum in other orders), so the tolerance is
    the definition's own: each max error against the definition computed in float64 may be at most 4x the float32
    definition's (seen: maps 0.4-1.0x, dq 1.0-1.2x, dk 1.1-2.5x; about 1e-8, a few float32 ulps of the values)."""
    monkeypatch.setattr(ad, "ROWS_PER_CHUNK", rows_per_chunk)
    q, k, allowed, cols = _qk_batch()
    B, H, T, D = q.shape
    if mask_kind == "none":
        allowed = (torch.arange(T)[None, :] <= torch.arange(T)[:, None]).expand(B, T, T)
    mask = None if mask_kind == "none" else allowed[:, None]
    rows = torch.arange(T).expand(B, T) if form == "all" else cols
    scaling = 1.0 / math.sqrt(D)
    weight = torch.randn(B, rows.shape[1], cols.shape[1])

    got = _probs_and_grads(lambda q, k: ad.attention_probs(q, k, mask, rows, cols), q, k, weight)
    ref32 = _probs_and_grads(lambda q, k: _reference_probs(q, k, allowed, rows, cols, scaling), q, k, weight)
    truth = _probs_and_grads(lambda q, k: _reference_probs(q, k, allowed, rows, cols, scaling),
                             q.double(), k.double(), weight.double())
    for name, g, r, t in zip(["maps", "dq", "dk"], got, ref32, truth):
        assert g.dtype == torch.float32
        assert (g.double() - t).abs().max() <= 4 * (r.double() - t).abs().max(), name
    if form == "all":  # every row read as it is (rows=None, what the capture passes) = the gathered rows, bitwise
        same = _probs_and_grads(lambda q, k: ad.attention_probs(q, k, mask, None, cols), q, k, weight)
        assert all(torch.equal(a, b) for a, b in zip(same, got))


# The capture as it was before its speed-ups (the mask by masked_fill_ broadcast over the heads, the query rows
# always gathered), kept verbatim as the reference of the bitwise checks below.
def _old_probs(q, k, blocked, scaling):
    dt = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        s = torch.einsum("bkgqd,bksd->bkgqs", q.to(dt) * scaling, k.to(dt))
        if blocked.dtype == torch.bool:
            s.masked_fill_(blocked[:, None, None], float("-inf"))
        else:
            s += blocked[:, None, None].to(dt)
        return s.softmax(-1)


class _OldImageAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, blocked, cols, scaling):
        ctx.save_for_backward(q, k, blocked, cols)
        ctx.scaling = scaling
        out = []
        for r0, r1 in ad._chunks(q.shape[3]):
            p = _old_probs(q[:, :, :, r0:r1], k, blocked[:, r0:r1], scaling)
            idx = cols[:, None, None, None, :].expand(*p.shape[:-1], cols.shape[1])
            out.append(p.gather(-1, idx).nan_to_num(0.0).mean(dim=(1, 2)))
        return out[0] if len(out) == 1 else torch.cat(out, 1)

    @staticmethod
    def backward(ctx, grad):
        q, k, blocked, cols = ctx.saved_tensors
        dq, dk = [], None
        for r0, r1 in ad._chunks(q.shape[3]):
            p = _old_probs(q[:, :, :, r0:r1], k, blocked[:, r0:r1], ctx.scaling).nan_to_num_(0.0)
            idx = cols[:, None, None, None, :].expand(*p.shape[:-1], cols.shape[1])
            gp = (grad[:, r0:r1] / (p.shape[1] * p.shape[2]))[:, None, None] * p.gather(-1, idx)
            ds = p.mul_(-gp.sum(-1, keepdim=True)).scatter_add_(-1, idx, gp)
            with torch.autocast(ds.device.type, enabled=False):
                dq.append(torch.einsum("bkgqs,bksd->bkgqd", ds, k.to(ds.dtype)) * ctx.scaling)
                part = torch.einsum("bkgqs,bkgqd->bksd", ds, q[:, :, :, r0:r1].to(ds.dtype)) * ctx.scaling
            dk = part if dk is None else dk + part
        dq = dq[0] if len(dq) == 1 else torch.cat(dq, 3)
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None


def _old_attention_probs(query, key, attention_mask, rows, cols, scaling=None):
    B, H, T, D = query.shape
    if rows is None:  # the new code's "every row", given to the old code as it was given then
        rows = torch.arange(T, device=query.device).expand(B, T)
    Hkv, S = key.shape[1], key.shape[2]
    Nq = rows.shape[1]
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(D)
    q = query.gather(2, rows[:, None, :, None].expand(B, H, Nq, D)).view(B, Hkv, H // Hkv, Nq, D)
    if attention_mask is None:
        blocked = torch.arange(S, device=key.device) > (rows[..., None] + (S - T))
    else:
        m = attention_mask.expand(B, -1, -1, -1)[:, 0].gather(1, rows[..., None].expand(B, Nq, S))
        blocked = ~m if m.dtype == torch.bool else m
    return _OldImageAttention.apply(q, key, blocked, cols, scaling)


def _bits(t):  # torch.equal counts -0.0 == 0.0; the bit patterns do not
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int64)


def _bitwise_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a.contiguous()), _bits(b.contiguous()))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("form", ["all", "image"])
def test_attention_probs_are_bitwise_those_of_the_code_before(form, mask_kind):
    q, k, allowed, cols = _qk_batch()
    B, H, T, D = q.shape
    mask = {"none": None, "bool": allowed[:, None],
            "float": torch.zeros(B, 1, T, T).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)}[mask_kind]
    rows = torch.arange(T).expand(B, T) if form == "all" else cols
    weight = torch.randn(B, rows.shape[1], cols.shape[1])
    want = _probs_and_grads(lambda q, k: _old_attention_probs(q, k, mask, rows, cols), q, k, weight)
    for r in ([rows, None] if form == "all" else [rows]):
        got = _probs_and_grads(lambda q, k: ad.attention_probs(q, k, mask, r, cols), q, k, weight)
        assert all(_bitwise_equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("queries,pool", [("all", "flat"), ("image", "column"), ("text", "flat")])
def test_a_distillation_step_is_bitwise_that_of_the_code_before(queries, pool, monkeypatch):
    """A small TeacherStudent (GQA in both; padding and a text-only sample in the batch): losses and every student
    gradient of a forward + backward, the capture as it is against the capture before its speed-ups."""
    import copy
    from data import IGNORE_INDEX
    from model import TeacherStudent
    from run_models import set_trainable
    t = tiny_vlm(layers=5, hidden=64, heads=8, kv_heads=2, seed=0)
    s = tiny_vlm(layers=3, hidden=32, heads=4, kv_heads=2, seed=1, vision_tower=copy.deepcopy(t.vision_tower))
    ts = TeacherStudent(t, s, ad.VATSettings(student_layers=[1, 2], teacher_layers=[1, 2, 3], vat_queries=queries,
                                             vat_pool=pool)).apply_taf()
    set_trainable(ts.student, train_llm=True)
    ts.student.train()
    ids, mask = tiny_ids()
    labels = ids.masked_fill(ids == 3, IGNORE_INDEX).masked_fill(mask == 0, IGNORE_INDEX)
    b = dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=torch.randn(2, 3, 16, 16))

    def step():
        ts.student.zero_grad(set_to_none=True)
        out = ts(b)
        (out["total"] + out["vat"]).backward()  # VAT's gradient also on its own weight
        return out, {n: p.grad for n, p in ts.student.named_parameters() if p.grad is not None}

    out, grads = step()
    with monkeypatch.context() as mp:
        mp.setattr(ad, "attention_probs", _old_attention_probs)
        out_old, grads_old = step()
    assert float(out["vat"]) > 0 and grads.keys() == grads_old.keys()
    assert all(_bitwise_equal(out[k].detach(), out_old[k].detach()) for k in out)
    assert all(_bitwise_equal(grads[n], grads_old[n]) for n in grads)
