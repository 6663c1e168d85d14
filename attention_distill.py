"""
The method's core: visual-attention capture, which rows and columns VAT reads, layer matching, the VAT loss and the
logit-KD loss. model.TeacherStudent calls these in its forward; alignment.py measures with the same functions.

Attention capture. Every LLM layer keeps running PyTorch SDPA (flash / memory-efficient kernels on
GPU), exactly as transformers' default "sdpa" does. We register one extra attention function under
the name ATTN_IMPLEMENTATION; it calls SDPA and, only for the attention modules that a
`capture_attention(...)` context has marked, also recomputes the post-softmax probabilities for the
query rows and image-key columns that the VAT loss needs, averaged over heads, in float32. No
`output_attentions=True`, no eager attention, no (B, H, T, T) tensor is ever kept.

Everything else here is small pure functions on tensors: the rows and columns VAT reads (vat_positions), the
seven VAT settings in one place (VATSettings), layer sets and group / simple / adaptive matching (match_layers: the
one function training and alignment.py both call), the matched maps from the captured ones (matched_maps), `vat_loss`
(reference-code and paper forms, cosine / MSE / KL) and `kd_loss`.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "compodistill_sdpa"

# -----------------------------------------------------------------------------
# attention capture


def _attention_with_capture(module, query, key, value, attention_mask, **kwargs):
    """SDPA, plus (only when this module is being captured) the probabilities VAT needs."""
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    capture = getattr(module, "_vat_capture", None)
    if capture is not None:
        capture.record(module, query, key, attention_mask, kwargs.get("scaling"))
    return out


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_with_capture)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # same masks as plain SDPA


def _probs(q, k, blocked, scaling):
    """softmax(q k^T * scaling) over all keys, float32: (B, Hkv, G, Nq, S). `blocked` (B, Nq, S): True where a
    query may not look (bool), or an additive float mask. A query that sees nothing gets a NaN row."""
    dt = torch.promote_types(q.dtype, torch.float32)  # float32 (float64 in gradcheck)
    # Autocast off: under bf16 autocast the einsum would run in bf16, and the forward (inside autocast) and the
    # recomputing backward (outside it) would then see two different softmaxes.
    with torch.autocast(q.device.type, enabled=False):
        s = torch.einsum("bkgqd,bksd->bkgqs", q.to(dt) * scaling, k.to(dt))
        if blocked.dtype == torch.bool:
            # Added as a (B, Nq, S) float 0 / -inf tensor, not masked_fill_ with the boolean mask broadcast over the
            # heads: the same numbers (s + 0 = s, s - inf = -inf), and a broadcast add is cheaper on CPU than a
            # broadcast masked fill (the 0 / -inf tensor is H times smaller than s and made per chunk, so what
            # backward keeps is still the boolean mask).
            blocked = torch.zeros(blocked.shape, dtype=dt, device=s.device).masked_fill_(blocked, float("-inf"))
        s += blocked[:, None, None].to(dt)
        return s.softmax(-1)


ROWS_PER_CHUNK = 256  # query rows whose probabilities exist at once: memory (B, H, 256, S), not (B, H, T, S)


def _chunks(n):
    return [(i, min(n, i + ROWS_PER_CHUNK)) for i in range(0, n, ROWS_PER_CHUNK)]


class _ImageAttention(torch.autograd.Function):
    """
    Head-averaged attention probabilities at the key columns `cols`, normalised over all keys. Saves only
    q, k and the mask, and recomputes the probabilities in backward (as flash attention does), ROWS_PER_CHUNK query
    rows at a time in both directions: with every row queried (the paper's form) the full (B, H, T, T) float32
    softmax would otherwise exist for each captured layer, twice in backward.
    """

    @staticmethod
    def forward(ctx, q, k, blocked, cols, scaling):
        ctx.save_for_backward(q, k, blocked, cols)
        ctx.scaling = scaling
        out = []
        for r0, r1 in _chunks(q.shape[3]):
            p = _probs(q[:, :, :, r0:r1], k, blocked[:, r0:r1], scaling)
            idx = cols[:, None, None, None, :].expand(*p.shape[:-1], cols.shape[1])
            out.append(p.gather(-1, idx).nan_to_num(0.0).mean(dim=(1, 2)))
        return out[0] if len(out) == 1 else torch.cat(out, 1)

    @staticmethod
    def backward(ctx, grad):
        q, k, blocked, cols = ctx.saved_tensors
        dq, dk = [], None
        for r0, r1 in _chunks(q.shape[3]):
            p = _probs(q[:, :, :, r0:r1], k, blocked[:, r0:r1], ctx.scaling).nan_to_num_(0.0)
            idx = cols[:, None, None, None, :].expand(*p.shape[:-1], cols.shape[1])
            # y_c = p_c = softmax(s)_c  =>  dL/ds_j = p_j (g_j [j in cols] - sum_c g_c p_c)
            gp = (grad[:, r0:r1] / (p.shape[1] * p.shape[2]))[:, None, None] * p.gather(-1, idx)  # 1/H per head
            ds = p.mul_(-gp.sum(-1, keepdim=True)).scatter_add_(-1, idx, gp)
            with torch.autocast(ds.device.type, enabled=False):
                dq.append(torch.einsum("bkgqs,bksd->bkgqd", ds, k.to(ds.dtype)) * ctx.scaling)
                part = torch.einsum("bkgqs,bkgqd->bksd", ds, q[:, :, :, r0:r1].to(ds.dtype)) * ctx.scaling
            dk = part if dk is None else dk + part
        dq = dq[0] if len(dq) == 1 else torch.cat(dq, 3)
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None


def attention_probs(query, key, attention_mask, rows, cols, scaling=None):
    """
    Head-averaged softmax(q k^T) for the query positions `rows` (B, Nq) and key positions `cols`
    (B, Nk): returns (B, Nq, Nk) float32. The softmax runs over every key the query may see
    (causal + padding mask), then the image columns are sliced out - as in the reference code, the
    map is *not* renormalised over image keys. GQA: query heads are grouped onto their kv head.
    rows=None: every query position 0..T-1, read as they are (no gather of q and of the mask rows).
    """
    B, H, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    Nq = T if rows is None else rows.shape[1]
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(D)
    if rows is None:  # every row: the gather would only copy q (and the mask)
        q = query.view(B, Hkv, H // Hkv, T, D)
        pos = torch.arange(T, device=key.device)[:, None]  # (T, 1)
    else:
        q = query.gather(2, rows[:, None, :, None].expand(B, H, Nq, D)).view(B, Hkv, H // Hkv, Nq, D)
        pos = rows[..., None]  # (B, Nq, 1)
    if attention_mask is None:  # SDPA ran with is_causal=True: rebuild the causal pattern
        blocked = (torch.arange(S, device=key.device) > (pos + (S - T))).expand(B, Nq, S)
    else:  # bool (True = may attend) or additive float; shared by the heads
        m = attention_mask.expand(B, -1, -1, -1)[:, 0]
        m = m if rows is None else m.gather(1, rows[..., None].expand(B, Nq, S))
        blocked = ~m if m.dtype == torch.bool else m
    return _ImageAttention.apply(q, key, blocked, cols, scaling)


class _Capture:
    def __init__(self, rows, cols):
        self.rows, self.cols, self.maps, self.pending = rows, cols, {}, {}
        # rows 0..Nq-1 in every sample (vat_queries=all or text: vat_positions' arange): with Nq = T, attention_probs
        # reads every row as it is (rows=None). Checked once per context (a host sync on GPU), not once per layer.
        self.arange_rows = rows is None or bool((rows == torch.arange(rows.shape[1], device=rows.device)).all())

    def _rows(self, query):
        return None if self.arange_rows and (self.rows is None or self.rows.shape[1] == query.shape[2]) else self.rows

    def record(self, module, query, key, attention_mask, scaling):
        if module.layer_idx in self.maps or module.layer_idx in self.pending:
            return
        if torch.is_grad_enabled():
            # Only keep references here; the maps are computed when the context closes, outside the layer:
            # non-reentrant gradient checkpointing replays each layer in backward (without this capture)
            # and needs the same saved tensors as the first run.
            self.pending[module.layer_idx] = (query, key, attention_mask, scaling)
        else:
            self.maps[module.layer_idx] = attention_probs(query, key, attention_mask, self._rows(query), self.cols,
                                                          scaling)

    def finish(self):
        for layer, (query, key, attention_mask, scaling) in self.pending.items():
            self.maps[layer] = attention_probs(query, key, attention_mask, self._rows(query), self.cols, scaling)
        self.pending.clear()


def attention_modules(llm):
    """{layer index: self-attention module} of a transformers causal LM."""
    mods = {m.layer_idx: m for m in llm.modules()
            if type(m).__name__.endswith("Attention") and getattr(m, "layer_idx", None) is not None}
    if not mods:
        raise ValueError(f"{type(llm).__name__}: found no attention modules with a layer_idx; "
                         "VAT needs a transformers LM that uses the attention interface")
    return mods


@contextmanager
def capture_attention(llm, layers, rows, cols):
    """
    Within this context, each forward of `llm` records, for every layer in `layers`, the
    head-averaged attention of query positions `rows` (B, Nq) on key positions `cols` (B, Nk).
    Yields the dict {layer: (B, Nq, Nk) float32}, filled during the forward.
    """
    if llm.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(f"attention capture needs attn_implementation='{ATTN_IMPLEMENTATION}', "
                         f"the model uses '{llm.config._attn_implementation}'")
    mods = attention_modules(llm)
    bad = [l for l in layers if l not in mods]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the LM has {len(mods)} layers (0..{len(mods) - 1})")
    capture = _Capture(rows, cols)
    for l in layers:
        mods[l]._vat_capture = capture
    try:
        yield capture.maps
        capture.finish()
    finally:
        for l in layers:
            del mods[l]._vat_capture


# -----------------------------------------------------------------------------
# which attention VAT reads: rows (queries) and columns (image keys)


def image_columns(is_img, num_image_tokens):
    """(B, N_v) sorted positions of each sample's image tokens, from is_img (B, T) bool (any N_v positions for a
    text-only sample, which callers mask out): the key columns VAT reads."""
    return is_img.int().argsort(dim=1, descending=True, stable=True)[:, :num_image_tokens].sort(1).values


def vat_positions(is_img, attention_mask, queries, num_image_tokens):
    """
    (rows (B, Nq), cols (B, N_v), row_mask (B, Nq) bool or None): the query rows and image-key columns whose
    attention VAT compares. queries="image": the image tokens' rows (the reference code's form); "all": every
    position (the paper's Eq. 2), "text": every position but the image tokens; for those two, row_mask marks the rows
    that count (not padding; not image tokens under "text"). Each sample's own image positions, never a fixed span.
    """
    B, T = is_img.shape
    cols = image_columns(is_img, num_image_tokens)
    rows, row_mask = cols, None
    if queries != "image":
        rows = torch.arange(T, device=is_img.device).expand(B, T)
        row_mask = attention_mask.bool() & (~is_img if queries == "text" else True)
    return rows, cols, row_mask


# -----------------------------------------------------------------------------
# the VAT settings, layer sets and matching


@dataclass
class VATSettings:
    """What VAT aligns and how; the fields carry the training settings' names (run.DEFAULTS explains each)."""
    student_layers: object = None   # the student layers (resolve_layers' forms: None, a name, a depth range, a list)
    teacher_layers: object = None   # the teacher layers they are matched to (the same forms)
    matching: str = "group"         # group | simple | adaptive
    vat_queries: str = "all"        # all | text | image: whose attention rows are compared
    vat_pool: str = "flat"          # flat (the paper's Eq. 2) | column (the reference code's per-column profile)
    vat_loss: str = "cosine"        # cosine | mse | kl
    vat_layer_reduce: str = "sum"   # sum | mean over the layer pairs

    def __post_init__(self):
        for name, allowed in (("matching", ("group", "simple", "adaptive")), ("vat_queries", ("image", "all", "text")),
                              ("vat_pool", ("column", "flat")), ("vat_loss", ("cosine", "mse", "kl")),
                              ("vat_layer_reduce", ("sum", "mean"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: use {', '.join(allowed)}")

    @classmethod
    def from_config(cls, cfg):
        """The settings of a training config dict (any other keys are ignored)."""
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__})

    def loss_kwargs(self):
        """vat_loss's keywords. The outlier filter belongs to the reference (column) form; the paper's flat form has
        none."""
        return dict(pool=self.vat_pool, loss=self.vat_loss, filter_outliers=self.vat_pool == "column",
                    layer_reduce=self.vat_layer_reduce)


# The reference code's "visual understanding" layers for its two model sizes.
LAYER_PRESETS = {24: list(range(8, 15)), 40: list(range(13, 24))}
# Depth fractions [lo, hi) for the layer ablation; "intermediate" reproduces both presets above.
DEPTH_RANGES = {"early": (0.0, 0.32), "intermediate": (0.32, 0.6), "late": (0.6, 1.0), "all": (0.0, 1.0)}


def resolve_layers(spec, num_layers):
    """
    A layer set from: None / "preset" (the reference table, else "intermediate"), a name in
    DEPTH_RANGES, a (lo, hi) depth-fraction pair, or an explicit list of layer indices.
    """
    if spec is None or spec == "preset":
        if num_layers in LAYER_PRESETS:
            return list(LAYER_PRESETS[num_layers])
        spec = "intermediate"
    if isinstance(spec, str):
        if spec not in DEPTH_RANGES:
            raise ValueError(f"unknown layer set '{spec}': use one of {['preset', *DEPTH_RANGES]}, "
                             "a (lo, hi) depth fraction or a list of layer indices")
        spec = DEPTH_RANGES[spec]
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(x, float) for x in spec):
        lo, hi = spec
        layers = [i for i in range(num_layers) if lo <= i / num_layers < hi]
    else:
        layers = [int(i) for i in spec]
    if not layers or any(not 0 <= i < num_layers for i in layers):
        raise ValueError(f"layer set {spec} gives {layers}, which is not a non-empty subset of 0..{num_layers - 1}")
    return layers


def group_matching(student_layers, teacher_layers):
    """Student layer j <-> the teacher window T[j : j+n], n = m - k + 1 (overlapping, stride 1)."""
    k, m = len(student_layers), len(teacher_layers)
    if m < k:
        raise ValueError(f"group matching needs at least as many teacher layers ({m}) as student layers ({k})")
    n = m - k + 1
    return [list(teacher_layers[j:j + n]) for j in range(k)]


def simple_matching(student_layers, teacher_layers):
    """One-to-one with a uniform stride: student j <-> T[floor(j * m / k)]."""
    k, m = len(student_layers), len(teacher_layers)
    return [teacher_layers[j * m // k] for j in range(k)]


@dataclass
class LayerPairs:
    """The matched layers: student[j] is aligned with the teacher layers windows[j] (their maps averaged; one layer
    under simple matching; adaptive matching picks one per step inside the window). teacher: the resolved teacher
    layer set the windows are cut from."""
    student: list
    teacher: list
    windows: list

    @property
    def captured(self):
        """The teacher layers whose maps a step needs, in order."""
        return sorted({l for w in self.windows for l in w})

    def note(self, matching):
        """What a checkpoint records of them (config extra "distill"), so later stages and evaluate.py find them."""
        return dict(student_layers=self.student, teacher_layers=self.teacher, matching=matching)


def match_layers(n_student, n_teacher, student_layers=None, teacher_layers=None, matching="group"):
    """The layer pairs VAT aligns between a student LM of n_student layers and a teacher of n_teacher: the two layer
    sets (resolve_layers), then the teacher windows of `matching` (adaptive matching is reported on its group
    windows, inside which it chooses per step)."""
    s = resolve_layers(student_layers, n_student)
    t = resolve_layers(teacher_layers, n_teacher)
    windows = [[l] for l in simple_matching(s, t)] if matching == "simple" else group_matching(s, t)
    return LayerPairs(student=s, teacher=t, windows=windows)


def window_average(maps_by_layer, windows):
    """(L, B, Nq, Nk): per window (a list of teacher layers), the mean of their maps; group matching's target."""
    return torch.stack([torch.stack([maps_by_layer[l] for l in w]).mean(0) for w in windows])


def pair_label(student_layer, window):
    """A matched pair in words, e.g. "student layer 1 vs teacher layers 2-3"."""
    t = f"layer {window[0]}" if len(window) == 1 else f"layers {window[0]}-{window[-1]}"
    return f"student layer {student_layer} vs teacher {t}"


def adaptive_matching(student_maps, teacher_maps_by_layer, windows, sample_mask=None):
    """
    Our definition (the paper names the strategy but does not define it): for each student layer
    j pick, inside group window j, the teacher layer whose map is most similar (mean cosine over
    samples of the flattened maps) to the student's detached map. `sample_mask` (B,) marks the
    samples that have an image; only they vote (a text-only sample's "image columns" are arbitrary
    positions). Returns one teacher layer per j.
    """
    B = student_maps.shape[1]
    w = (torch.ones(B, device=student_maps.device) if sample_mask is None else sample_mask.float())
    w = w / w.sum().clamp(min=1)
    chosen = []
    for j, window in enumerate(windows):
        s = student_maps[j].detach().flatten(1)
        sims = [(F.cosine_similarity(s, teacher_maps_by_layer[t].detach().flatten(1).to(s), dim=1) * w).sum()
                for t in window]
        chosen.append(window[int(torch.stack(sims).argmax())])
    return chosen


# -----------------------------------------------------------------------------
# losses


def outlier_keep(A):
    """A <= mean + std of each (layer, sample) block; std unbiased; causal zeros included."""
    flat = A.flatten(2)
    thr = flat.mean(-1) + flat.std(-1)
    return A <= thr[..., None, None]


def _distance(p_s, p_t, loss):
    """Per-row distance between two batches of vectors (..., N)."""
    if loss == "cosine":
        return 1.0 - F.cosine_similarity(p_s, p_t, dim=-1, eps=1e-8)
    if loss == "mse":
        return (p_s - p_t).pow(2).mean(-1)
    if loss == "kl":  # KL(target || student) between the vectors normalised to distributions
        eps = 1e-8
        q_t = p_t / (p_t.sum(-1, keepdim=True) + eps)
        q_s = p_s / (p_s.sum(-1, keepdim=True) + eps)
        return (q_t * ((q_t + eps).log() - (q_s + eps).log())).sum(-1)
    raise ValueError(f"unknown VAT loss '{loss}': use cosine, mse or kl")


def vat_loss(student_maps, teacher_maps, pool="column", loss="cosine", filter_outliers=True,
             sample_mask=None, layer_reduce="sum"):
    """
    Visual attention alignment. `student_maps`, `teacher_maps`: (L, B, Nq, Nk) float, already
    matched (teacher maps group-averaged). `sample_mask` (B,) marks samples that have an image.

    pool="column" (reference code): per (pair, sample) keep entries that are not outliers in
    either map (<= mean + std) and where the teacher is non-zero, average each image column over
    its kept rows, and compare the two column profiles. pool="flat" (paper Eq. 2): compare the
    flattened maps. The per-sample losses are averaged over masked samples and summed over layer
    pairs (layer_reduce="mean" averages them, as the paper's Eq. 2 does).
    """
    A_s, A_t = student_maps.float(), teacher_maps.float()
    if filter_outliers:  # valid: (L, B, Nq, Nk) bool
        valid = outlier_keep(A_s) & outlier_keep(A_t) & (A_t != 0)
    else:
        valid = torch.ones_like(A_s, dtype=torch.bool)
    if pool == "column":
        count = valid.sum(-2).clamp(min=1)
        p_s = (A_s * valid).sum(-2) / count  # (L, B, Nk): each column's mean over its kept rows
        p_t = (A_t * valid).sum(-2) / count
    elif pool == "flat":
        p_s, p_t = (A_s * valid).flatten(2), (A_t * valid).flatten(2)  # (L, B, Nq * Nk)
    else:
        raise ValueError(f"unknown VAT pooling '{pool}': use column or flat")
    per = _distance(p_s, p_t, loss)  # (L, B)
    if sample_mask is None:
        sample_mask = torch.ones(per.shape[1], dtype=torch.bool, device=per.device)
    w = sample_mask.to(per.dtype)  # (B,)
    per_layer = (per * w).sum(1) / w.sum().clamp(min=1)  # (L,): mean over samples with an image
    return per_layer.sum() if layer_reduce == "sum" else per_layer.mean()


def matched_maps(maps_s, maps_t, pairs, settings, has_img, row_mask=None):
    """
    What vat_loss compares, from the captured maps ({layer: (B, Nq, Nk)} of student and teacher): the student's maps
    in the matched layers and the teacher's targets (the window means, or adaptive matching's choice among samples
    with an image, `has_img`), rows outside `row_mask` zeroed. Returns (A_s, A_t), (L, B, Nq, Nk) each.
    """
    A_s = torch.stack([maps_s[l] for l in pairs.student])  # (L, B, Nq, Nv): L matched student layers
    if settings.matching == "adaptive":
        chosen = adaptive_matching(A_s, maps_t, pairs.windows, sample_mask=has_img)
        A_t = torch.stack([maps_t[l] for l in chosen])  # (L, B, Nq, Nv)
    else:
        A_t = window_average(maps_t, pairs.windows)  # (L, B, Nq, Nv): each window's mean
    if row_mask is not None:  # rows that are padding (or not text) count for nothing
        A_s, A_t = A_s * row_mask[None, :, :, None], A_t * row_mask[None, :, :, None]
    return A_s, A_t


def kd_loss(student_logits, teacher_logits, temperature=1.0, vocab_size=None):
    """
    L_KD: forward KL(p_t || p_s) per row of (N, V) logits, averaged over rows, tau^2-scaled (Hinton). The rows
    are the positions that *predict* a supervised token (position t where labels[t + 1] is not data.IGNORE_INDEX:
    shifted like the LM loss; the reference code masks the unshifted labels, an off-by-one), and only there are
    logits computed (TeacherStudent.forward). Both sides are read over the first `vocab_size` ids (the tokenizer's
    real vocabulary; default: the smaller of the two): embedding matrices are often padded past it, by different
    amounts in teacher and student.
    """
    V = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
    t = teacher_logits[..., :V].float() / temperature
    s = student_logits[..., :V].float() / temperature
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature ** 2 if kl.numel() else s.sum() * 0.0

