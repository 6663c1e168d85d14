"""
Winoground / BiVLC-style pairs: two images, two captions, each caption belonging to one image; scored by likelihood.

File: winoground.jsonl, one {"image_0", "image_1", "caption_0", "caption_1"} (Winoground) or {"image",
"negative_image", "caption", "negative_caption"} (BiVLC) a line. The 2x2 table of length-normalised log P(caption |
image, caption_prompt) gives Winoground's text / image / group scores.
"""
from tasks.common import CAPTION_PROMPT, keep_with_images, mean, pct, read_list


def winoground_scores(S):
    """
    S[i][j] = score(caption_i, image_j), caption_i belongs to image_i. text: for each image its own
    caption scores higher; image: for each caption its own image scores higher; group: both. Ties fail.
    """
    (s00, s01), (s10, s11) = [[float(x) for x in row] for row in S]
    text = s00 > s10 and s11 > s01
    image = s00 > s01 and s11 > s10
    return dict(text=float(text), image=float(image), group=float(text and image))


def load(path, folders, limit=None):
    """(items, skipped) of a Winoground or BiVLC file, both images of each item checked."""
    items = []
    for r in read_list(path)[:limit or None]:
        if "image_0" in r:
            items.append(dict(images=[r["image_0"], r["image_1"]], captions=[r["caption_0"], r["caption_1"]]))
        else:
            items.append(dict(images=[r["image"], r["negative_image"]], captions=[r["caption"], r["negative_caption"]]))
    for it in items:
        it["image_0"], it["image_1"] = it["images"]
    items, skipped = keep_with_images(items, ["image_0", "image_1"], folders, f"wino ({path})")
    for it in items:
        it["images"] = [it["image_0"], it["image_1"]]
    return items, skipped


def run(r, items, caption_prompt=CAPTION_PROMPT):
    """The Winoground report: text, image and group scores, averaged over the items."""
    specs = [(caption_prompt, it["images"][j], it["captions"][i]) for it in items for i in (0, 1) for j in (0, 1)]
    lp = r.loglik(specs, "wino")
    per = [winoground_scores([[lp[4 * k], lp[4 * k + 1]], [lp[4 * k + 2], lp[4 * k + 3]]]) for k in range(len(items))]
    return dict(n=len(items), **{k: mean(p[k] for p in per) for k in ("text", "image", "group")})


def markdown(w, skipped=""):
    """The report's Winoground section, as markdown lines; skipped: " (k skipped)" or ""."""
    md = ["## Winoground-style", "", f"text {pct(w['text'])}, image {pct(w['image'])}, "
          f"group {pct(w['group'])} on {w['n']} items{skipped}", ""]
    return md
