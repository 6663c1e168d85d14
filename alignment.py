"""
The paper's diagnosis: does the student look at the image where the teacher looks? For each matched layer pair
(student layer j, teacher window j, as in training), the head-averaged attention on the image-token keys, compared
three ways, and drawn as heat maps over the patch grid.

  image queries  rows = the image tokens (what the reference code's VAT form aligns): 1 - that column-form distance
                 (attention_distill.vat_loss, cosine, averaged over the pairs: exactly 1 - the training loss of
                 vat_queries=image vat_pool=column with vat_layer_reduce="mean") and the plain cosine of the
                 flattened maps.
  all queries    rows = every position (image and text): 1 - the paper's VAT distance (the training default: the
                 flattened maps, cosine, averaged over the pairs).
  text queries   rows = the text after the image (the question, or the caption being scored): the cosine of the
                 flattened maps and of the row-averaged profiles. With the LLaVA layout (image first) and causal
                 attention, image-token queries never see the text, so image-query numbers depend on the image
                 alone; text-query numbers are the ones that differ between tasks.

evaluate.py calls align_task (the "align" task) and heatmap_task (--heatmaps=N) with its Runner, which batches
(prompt, image, answer) specs through the same chat template as training, and the layer pairs of matched_layers;
markdown() is the alignment's section of report.md.
"""
import math
import os
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import attention_distill as ad
from data import load_image
from tasks.common import pct

# -----------------------------------------------------------------------------
# attention of every query position on the image keys, in the matched layers


def matched_layers(student, teacher, student_layers=None, teacher_layers=None, matching=None):
    """
    The layer pairs (attention_distill.LayerPairs) as in training: explicit arguments, else the layers the student
    was distilled on (config.extra["distill"], carried by run_log.Checkpointer through later stages), else its training
    config, else the presets. Without a teacher, the student layers alone (teacher and windows None). Adaptive
    matching is reported on its group windows (it picks per step in training).
    """
    extra = student.config.extra or {}
    tc = extra.get("distill") or extra.get("train_config", {})
    student_layers = student_layers if student_layers is not None else tc.get("student_layers")
    teacher_layers = teacher_layers if teacher_layers is not None else tc.get("teacher_layers")
    matching = matching or tc.get("matching") or "group"
    n_student = student.llm.config.num_hidden_layers
    if teacher is None:
        return ad.LayerPairs(student=ad.resolve_layers(student_layers, n_student), teacher=None, windows=None)
    return ad.match_layers(n_student, teacher.llm.config.num_hidden_layers, student_layers, teacher_layers, matching)


@torch.no_grad()
def attention_maps(model, b, layers):
    """{layer: (B, T, N_v)} head-averaged attention of every query position on the image keys, and cols."""
    ids, mask = b["input_ids"], b["attention_mask"]
    is_img, has_img = model.image_positions(ids)
    if not bool(has_img.all()):
        raise ValueError("attention maps need an image in every sample")
    B, T = ids.shape
    cols = ad.image_columns(is_img, model.num_image_tokens)
    rows = torch.arange(T, device=ids.device).expand(B, T)
    with ad.capture_attention(model.llm, layers, rows, cols) as maps:
        model.hidden_states(ids, mask, model.image_embeds(b["pixel_values"]))
    return dict(maps), cols


def matched_stack(b, student, teacher, pairs):
    """A_s, A_t: (L, B, T, N_v) (A_t None without a teacher; teacher windows averaged), cols, text rows."""
    maps_s, cols = attention_maps(student, b, pairs.student)
    A_s = torch.stack([maps_s[l] for l in pairs.student])
    A_t = None
    if teacher is not None:
        maps_t, _ = attention_maps(teacher, b, pairs.captured)
        A_t = ad.window_average(maps_t, pairs.windows)
    T = b["input_ids"].shape[1]
    text_rows = b["attention_mask"].bool() & (torch.arange(T, device=cols.device)[None] > cols[:, -1:])
    return A_s.float(), None if A_t is None else A_t.float(), cols, text_rows


def image_rows(A, cols):
    """(L, B, N_v, N_v): the image-token query rows of (L, B, T, N_v) maps."""
    L, B, _, Nv = A.shape
    return A.gather(2, cols[None, :, :, None].expand(L, B, Nv, Nv))


def run_align(r, teacher, pairs, specs, desc):
    """Mean student-teacher attention similarity over `specs` (prompt, image, answer or None), in the layer pairs
    `pairs`."""
    L = len(pairs.student)
    sums = defaultdict(float)
    pair = defaultdict(lambda: [0.0] * L)
    n = 0
    for b, chunk in r.batches(specs, desc):
        A_s, A_t, cols, text_rows = matched_stack(b, r.model, teacher, pairs)
        B = A_s.shape[1]
        I_s, I_t = image_rows(A_s, cols), image_rows(A_t, cols)
        flat = F.cosine_similarity(I_s.flatten(2), I_t.flatten(2), dim=-1, eps=1e-8)  # (L, B)
        for l in range(L):  # vat_loss averages over samples: times B gives the batch's sum
            vat = 1.0 - float(ad.vat_loss(I_s[l:l + 1], I_t[l:l + 1], pool="column", loss="cosine",
                                          filter_outliers=True, layer_reduce="mean"))
            pair["vat_cos"][l] += vat * B
            pair["flat_cos"][l] += float(flat[l].sum())
        # the paper's form (the training default): every query row's attention over the image, flattened
        rm = b["attention_mask"][None, :, :, None].to(A_s.dtype)
        sums["all_vat_cos"] += B * (1.0 - float(ad.vat_loss(A_s * rm, A_t * rm, pool="flat", loss="cosine",
                                                            filter_outliers=False, layer_reduce="mean")))
        tm = text_rows[None, :, :, None].float()
        T_s, T_t = A_s * tm, A_t * tm
        sums["text_flat_cos"] += float(F.cosine_similarity(T_s.flatten(2), T_t.flatten(2), dim=-1,
                                                           eps=1e-8).mean(0).sum())
        sums["text_column_cos"] += float(F.cosine_similarity(T_s.sum(2), T_t.sum(2), dim=-1, eps=1e-8).mean(0).sum())
        n += B
    names = [ad.pair_label(s, w) for s, w in zip(pairs.student, pairs.windows)]
    per_pair = {nm: dict(vat_cos=pair["vat_cos"][l] / n, flat_cos=pair["flat_cos"][l] / n)
                for l, nm in enumerate(names)}
    mean = lambda key: sum(v[key] for v in per_pair.values()) / len(per_pair)  # noqa: E731
    return dict(n=n, image_queries=dict(vat_cos=mean("vat_cos"), flat_cos=mean("flat_cos"), per_pair=per_pair),
                text_queries=dict(flat_cos=sums["text_flat_cos"] / n, column_cos=sums["text_column_cos"] / n),
                all_queries=dict(vat_cos=sums["all_vat_cos"] / n))


def align_task(r, teacher, pairs, items, answer_suffix, caption_prompt, rep):
    """The "align" task: the alignment on the VQA questions (prompt only) and on CR's true captions (prompt and
    caption), each where the test set has the file, into the dict `rep` as each finishes (an interrupted run keeps
    the part it finished). items(task): that task's items, None without its file."""
    if items("vqa") is not None:
        rep["vqa"] = run_align(r, teacher, pairs, [(it["question"] + answer_suffix, it["image"], None)
                                                   for it in items("vqa")], "align vqa")
    if items("cr") is not None:
        rep["cr"] = run_align(r, teacher, pairs, [(caption_prompt, it["image"], it["pos"]) for it in items("cr")],
                              "align cr")


def markdown(align):
    """The alignment's section of report.md, one row per task."""
    md = ["## Attention alignment (student vs teacher, matched layers)", "",
          "| task | n | all q: 1 - paper VAT | img q: 1 - reference VAT | img q: flat cos | text q: flat cos | "
          "text q: column cos | per pair (img q, 1 - VAT) |",
          "|---|---|---|---|---|---|---|---|"]
    for t, a in align.items():
        pp = ", ".join(f"{k} {pct(v['vat_cos'], 2)}" for k, v in a["image_queries"]["per_pair"].items())
        md.append(f"| {t} | {a['n']} | {pct(a['all_queries']['vat_cos'], 2)} | "
                  f"{pct(a['image_queries']['vat_cos'], 2)} | {pct(a['image_queries']['flat_cos'], 2)} | "
                  f"{pct(a['text_queries']['flat_cos'], 2)} | {pct(a['text_queries']['column_cos'], 2)} | {pp} |")
    md.append("")
    return md


# -----------------------------------------------------------------------------
# heat maps (Pillow only)

# Anchors of matplotlib's "inferno" colour map, interpolated linearly.
_INFERNO = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                     (250, 193, 39), (252, 255, 164)], dtype=np.float32)
# pixel sizes: a panel, the title, the column headers, the range line under each panel, the row labels, the
# colour bar at the bottom; alpha: how much colour covers the image
HEAT = dict(panel=128, title_h=34, header_h=32, caption_h=15, label_w=112, bar_h=36, alpha=0.6)


def colormap(x):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 inferno colours."""
    pos = np.clip(x, 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_INFERNO) - 2)
    t = (pos - lo)[..., None]
    return ((1 - t) * _INFERNO[lo] + t * _INFERNO[lo + 1]).round().astype(np.uint8)


def heatmap_size(n_pairs, n_rows, panel=HEAT["panel"]):
    """(width, height) of a heat-map picture: label column + image + one panel per matched pair; per row a panel
    and its range line; the colour bar below."""
    return (HEAT["label_w"] + (1 + n_pairs) * panel,
            HEAT["title_h"] + HEAT["header_h"] + n_rows * (panel + HEAT["caption_h"]) + HEAT["bar_h"])


def load_font(size=12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw, text, font, width, max_lines=2):
    lines, cur = [], ""
    for w in text.split():
        cand = f"{cur} {w}".strip()
        if draw.textlength(cand, font=font) <= width or not cur:
            cur = cand
        else:
            lines.append(cur)
            cur = w
    lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(0, len(lines[-1]) - 3)] + "..."
    return lines


def patch_grid(profile, patches=None):
    """(N_v,) attention over image tokens -> (g, g) patch grid for a tower with `patches` patches: a dropped first
    patch (SigLIP under the "default" strategy) shows as 0, a CLS token (CLIP under "full") is left out."""
    v = profile.detach().float().cpu().numpy()
    if patches is not None and len(v) == patches - 1:
        v = np.concatenate([[0.0], v])
    elif patches is not None and len(v) == patches + 1:
        v = v[1:]
    g = int(round(math.sqrt(len(v))))
    if g * g != len(v):
        raise ValueError(f"{len(v)} image tokens do not form a square patch grid")
    return v.reshape(g, g)


def draw_heatmaps(path, image, title, rows, col_titles, panel=HEAT["panel"]):
    """
    One PNG: a title, the column headers (the image, then each matched pair in words), then one row per
    (label, [grid per matched pair]): the image, then each grid upsampled onto it with the colour map blended
    over it. Every panel is scaled to its own range (min to max), printed under it; the colour bar at the bottom
    reads from a panel's minimum (left) to its maximum (right).
    """
    W, H = heatmap_size(len(col_titles), len(rows), panel)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    font = load_font(12)
    for i, line in enumerate(_wrap(d, title, font, W - 8)):
        d.text((4, 2 + 15 * i), line, fill=(0, 0, 0), font=font)
    x0, y0 = HEAT["label_w"], HEAT["title_h"]
    for j, ct in enumerate(["image"] + list(col_titles)):
        for k, line in enumerate(_wrap(d, ct, font, panel - 6)):
            d.text((x0 + j * panel + 3, y0 + 1 + 14 * k), line, fill=(0, 0, 0), font=font)
    y0 += HEAT["header_h"]
    base = image.convert("RGB").resize((panel, panel), Image.NEAREST if image.width < panel else Image.BICUBIC)
    base_np = np.asarray(base, dtype=np.float32)
    row_h = panel + HEAT["caption_h"]
    for i, (label, grids) in enumerate(rows):
        y = y0 + i * row_h
        for k, line in enumerate(_wrap(d, label, font, HEAT["label_w"] - 6, max_lines=4)):
            d.text((3, y + 4 + 15 * k), line, fill=(0, 0, 0), font=font)
        canvas.paste(base, (x0, y))
        for j, grid in enumerate(grids):
            g = grid - grid.min()
            g = g / g.max() if g.max() > 0 else g
            # nearest: one block per image token, so the picture shows exactly what the model attends to
            up = np.asarray(Image.fromarray(g.astype(np.float32), mode="F").resize((panel, panel), Image.NEAREST))
            blend = (1 - HEAT["alpha"]) * base_np + HEAT["alpha"] * colormap(up).astype(np.float32)
            x = x0 + (j + 1) * panel
            canvas.paste(Image.fromarray(blend.clip(0, 255).astype(np.uint8)), (x, y))
            # the panel's own range, under it (each panel is scaled min to max, so magnitudes are read here)
            d.text((x + 3, y + panel + 1), f"{grid.min():.3g} to {grid.max():.3g}", fill=(60, 60, 60), font=font)
    # the colour bar: a panel's minimum on the left, its maximum on the right
    yb, xb, wb = y0 + len(rows) * row_h + 4, x0 + panel, len(col_titles) * panel - 8
    ramp = colormap(np.tile(np.linspace(0, 1, max(wb, 2), dtype=np.float32), (12, 1)))
    canvas.paste(Image.fromarray(ramp), (xb, yb))
    left, right = ("each panel's minimum", "its maximum") if wb > 260 else ("panel min", "max")  # one column: short
    d.text((xb, yb + 14), left, fill=(0, 0, 0), font=font)
    d.text((xb + wb - d.textlength(right, font=font), yb + 14), right, fill=(0, 0, 0), font=font)
    canvas.save(path)
    return path


def profiles(A, cols, text_rows, b):
    """Per matched layer, the heat-map profiles over image keys for sample b: image-query rows (column
    mean over the model's own non-outlier entries, as VAT's column form) and text-query rows (mean)."""
    I = image_rows(A[:, b:b + 1], cols[b:b + 1])[:, 0]  # (L, Nv, Nv)
    keep = ad.outlier_keep(I[:, None])[:, 0] & (I != 0)
    img = (I * keep).sum(1) / keep.sum(1).clamp(min=1)
    tm = text_rows[b][None, :, None].float()
    txt = (A[:, b] * tm).sum(1) / tm.sum().clamp(min=1)
    return img, txt


def write_heatmaps(r, teacher, pairs, specs, titles, out_dir):
    """One heat-map PNG per spec in out_dir (heatmap_000.png, ...); returns their paths."""
    paths = []
    vc = r.model.vision_tower.config
    patches = (vc.image_size // vc.patch_size) ** 2
    if pairs.windows is not None:
        col_titles = [ad.pair_label(s, w) for s, w in zip(pairs.student, pairs.windows)]
    else:
        col_titles = [f"layer {s}" for s in pairs.student]
    k = 0
    for b, chunk in r.batches(specs, "heatmaps"):
        A_s, A_t, cols, text_rows = matched_stack(b, r.model, teacher, pairs)
        for i, spec in enumerate(chunk):
            img_s, txt_s = profiles(A_s, cols, text_rows, i)
            rows = []
            if A_t is not None:
                img_t, txt_t = profiles(A_t, cols, text_rows, i)
                rows.append(("teacher, image queries", [patch_grid(p, patches) for p in img_t]))
            who = "student" if A_t is not None else "model"
            rows.append((f"{who}, image queries", [patch_grid(p, patches) for p in img_s]))
            if A_t is not None:
                rows.append(("teacher, text queries", [patch_grid(p, patches) for p in txt_t]))
            rows.append((f"{who}, text queries", [patch_grid(p, patches) for p in txt_s]))
            image = load_image(os.path.join(r.folder, spec[1]))
            path = os.path.join(out_dir, f"heatmap_{k:03d}.png")
            paths.append(draw_heatmaps(path, image, titles[k], rows, col_titles))
            k += 1
    return paths


def heatmap_task(r, teacher, pairs, items, n, answer_suffix, caption_prompt, out_dir):
    """--heatmaps=n: heat maps of the first VQA questions (half, rounded up) and the first CR captions (the rest) into
    out_dir; returns their paths. items(task): that task's items, None without its file."""
    os.makedirs(out_dir, exist_ok=True)
    specs, titles = [], []
    vqa_items = items("vqa")[:(n + 1) // 2] if items("vqa") is not None else []
    cr_items = items("cr")[:n - len(vqa_items)] if items("cr") is not None else []
    for it in vqa_items:
        specs.append((it["question"] + answer_suffix, it["image"], None))
        titles.append(f"VQA: {it['question']}  (answer: {it['answers']})")
    for it in cr_items:
        specs.append((caption_prompt, it["image"], it["pos"]))
        titles.append(f"CR {it['subset']}: {it['pos']}")
    return write_heatmaps(r, teacher, pairs, specs, titles, out_dir)
