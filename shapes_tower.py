"""
The shapes world's "pretrained SigLIP": a small SigLIP vision tower trained from scratch to say what each patch of a
shapes image shows, saved where the VLMs load it (`vision_model=<world>/vision_tower`).

It stands in for the real recipe's pretrained tower: teacher and students share it, frozen, so they differ only where
CompoDistill says they do, in how their LMs use the visual tokens. What it is trained to name depends on the world's
`tower_labels` rule (shapes.WORLDS), and the labels are made here from the world's scenes:
  cell            per grid cell (one patch per cell): its object's colour, shape and size (0 for none), its row and
                  column (cell_labels)
  blocks(+shape)  per patch (hard world): what covers each of its SUB x SUB blocks (shapes.label_map), the patch's row
                  and column (and the shape of the object covering most of it), never what another patch shows
                  (patch_labels)
(It is pretrained on its own because a tower learned through the teacher's LM gets too little signal at a CPU
budget: the teacher learns to ignore the image.) Linear heads on the feature layer the VLMs read (LLaVA's second to
last) do the naming; they are thrown away.

    python shapes.py --out=out/shapes      # writes the world, then calls pretrain_tower -> out/shapes/vision_tower
Imports run one way: this file reads the world (shapes); shapes.py imports it only inside its command line.
"""
import json
import os
from collections import Counter

from tqdm import tqdm

from shapes import CLUTTER_ID, COLORS, SHAPES, SIZES, SUB, _write, label_map

# image_size comes from the world; patch_size defaults to one patch per grid cell (48 px / 3 -> 16 px, 9 tokens)
TOWER = dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=4)


def cell_labels(objects, patches, grid):
    """Per patch (row-major, patches x patches), what lies in the cell under the patch centre and where:
    (colour, shape, size, row, col); colour/shape/size are 0 for an empty cell, else 1 + the index in
    COLORS / SHAPES / SIZES; row/col are the cell's."""
    by_cell = {(o["row"], o["col"]): o for o in objects}
    labels = []
    for k in range(patches * patches):
        r, c = divmod(k, patches)
        cell = (int((r + 0.5) / patches * grid), int((c + 0.5) / patches * grid))
        o = by_cell.get(cell)
        what = (0, 0, 0) if o is None else (1 + list(COLORS).index(o["color"]), 1 + SHAPES.index(o["shape"]),
                                            1 + list(SIZES).index(o["size"]))
        labels.append(what + cell)
    return labels


def patch_labels(objects, image_size, patch_size, clutter=(), shape=True):
    """Per patch (row-major), what the patch itself shows: what covers each of its SUB x SUB blocks (label_map
    ids: 0 background, 1 + colour index, CLUTTER_ID); with `shape`, the shape of the object that covers most of its
    blocks (0: no object; 1 + SHAPES index; ties to the lower colour id); then the patch's own row and column.
    Never a size, and never what another patch shows."""
    blocks = label_map(objects, image_size, patch_size // SUB, clutter)
    n, shape_of = image_size // patch_size, {1 + list(COLORS).index(o["color"]): 1 + SHAPES.index(o["shape"])
                                             for o in objects}
    out = []
    for r in range(n):
        for c in range(n):
            b = [int(v) for v in blocks[r * SUB:(r + 1) * SUB, c * SUB:(c + 1) * SUB].flatten()]
            ids = Counter(v for v in b if v in shape_of)
            main = min(ids, key=lambda v: (-ids[v], v)) if ids else None
            out.append(tuple(b) + ((shape_of[main] if main else 0,) if shape else ()) + (r, c))
    return out


def pretrain_tower(world, out=None, vision=TOWER, steps=800, batch_size=64, lr=2e-3, seed=0, progress=True):
    """Train a tower on the world's training images to name what its `tower_labels` rule says (module docstring), and
    save it (with the image processor and pretraining.json) to `out`. Returns the accuracy on the test images: per
    label, or per kind of evidence (blocks)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoImageProcessor, AutoModel
    from data import load_image
    from model import VLMConfig, backbone_config
    meta = json.load(open(os.path.join(world, "meta.json")))
    scenes = json.load(open(os.path.join(world, "scenes.json")))
    proc = AutoImageProcessor.from_pretrained(os.path.join(world, "image_processor"))
    rules = meta.get("world", {})  # absent: the default world (per-cell labels, one patch per cell)
    mode = rules.get("tower_labels", "cell")
    by_patch, with_shape = mode.startswith("blocks"), mode == "blocks+shape"
    vision = dict(vision, image_size=meta["image_size"])
    vision.setdefault("patch_size", rules.get("patch_size") or meta["image_size"] // meta["grid"])
    patches = vision["image_size"] // vision["patch_size"]
    torch.manual_seed(seed)
    tower = AutoModel.from_config(backbone_config(vision))
    layer = VLMConfig.vision_feature_layer  # what the VLM reads (LLaVA: second to last)
    if by_patch:
        names = [f"block{k}" for k in range(SUB * SUB)] + ["shape"] * with_shape + ["row", "col"]
        n_out = [CLUTTER_ID + 1] * SUB * SUB + [1 + len(SHAPES)] * with_shape + [patches, patches]
    else:
        names = ["color", "shape", "size", "row", "col"]
        n_out = [1 + len(COLORS), 1 + len(SHAPES), 1 + len(SIZES), meta["grid"], meta["grid"]]
    heads = torch.nn.Linear(vision["hidden_size"], sum(n_out))

    def labels(p):
        sc = scenes[p]
        if by_patch:
            return patch_labels(sc["objects"], meta["image_size"], vision["patch_size"], sc.get("clutter", ()),
                                shape=with_shape)
        return cell_labels(sc["objects"], patches, meta["grid"])

    def load(split):
        paths = sorted(p for p, s in scenes.items() if s["split"] == split)
        px = proc([load_image(os.path.join(world, p)) for p in paths], return_tensors="pt")["pixel_values"]
        y = torch.tensor([labels(p) for p in paths])
        return px, y

    def losses(px, y):
        z = heads(tower(pixel_values=px, output_hidden_states=True).hidden_states[layer]).split(n_out, -1)
        return sum(F.cross_entropy(zi.flatten(0, 1), y[..., i].flatten()) for i, zi in enumerate(z)), z

    train_px, train_y = load("train")
    test_px, test_y = load("test")
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="shapes vision tower", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(train_px), (batch_size,), generator=g)
        loss, _ = losses(train_px[idx], train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    with torch.no_grad():
        _, z = losses(test_px, test_y)
    acc = {k: float((zi.argmax(-1) == test_y[..., i]).float().mean()) for i, (k, zi) in enumerate(zip(names, z))}
    if by_patch:  # one number per kind of evidence: every block; blocks that show an object; blocks of clutter
        pred = torch.stack([zi.argmax(-1) for zi in z[:SUB * SUB]], -1)
        y = test_y[..., :SUB * SUB]
        acc = dict(block=float((pred == y).float().mean()),
                   object_block=float((pred == y)[(y > 0) & (y < CLUTTER_ID)].float().mean()),
                   clutter_block=float((pred == y)[y == CLUTTER_ID].float().mean()) if (y == CLUTTER_ID).any() else None,
                   **{k: acc[k] for k in ("shape", "row", "col") if k in acc})
    if out:
        tower.save_pretrained(out)
        proc.save_pretrained(out)
        _write(os.path.join(out, "pretraining.json"), dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                                           feature_layer=layer, test_accuracy=acc))
    return acc
