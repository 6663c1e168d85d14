"""The embedded synthetic "shapes" world: images, captions, instructions and test sets.

    python shapes.py                 # -> out/shapes: the default world and its vision tower (shapes_tower.py)
    python shapes.py --world=hard    # -> out/shapes_hard: the hard world (WORLDS["hard"])

Each image is a black canvas cut into a grid (default 3x3) with 2-4 filled objects, at most one per cell, slightly
jittered inside it. An object is a colour (8), a shape (circle, square, triangle, diamond, cross, star) and a size
(small / large). Within one image colours are unique and shapes are unique, so "the red one" and "the square" always
name exactly one object. Four colour-shape combos (HELD_OUT) never occur in training images and are forced into half
of the test images, to probe composition beyond memorised pairs.

Everything is written in the formats the real-data code reads, so one pipeline serves both:
  pretrain.json        LLaVA-Pretrain: {"id", "image", "conversations": [human prompt, gpt caption]}
  instruct.json        LLaVA mix665K: 1-3 turn conversations (MIX), ~2 % text-only
  test/vqa.jsonl       {"question", "answer", "image", "type"}: one question of every kind MIX asks per test image;
                       yes/no kinds also carry "answer_type": "yes/no" (tasks/vqa.py's verdict figure)
  test/cr/{subset}.json  SugarCrepe: {id: {"filename", "caption", "negative_caption"}}
  test/pope_{random,popular,adversarial}.jsonl  {"question", "answer", "image", "category", "object"}
  test/reefknot/YESNO.jsonl  Reefknot: {"image_id", "query_prompt", "label", "relation_type"}, spatial relations
  scenes.json          every image's objects (ground truth for checks, evaluation and privileged.py)
  tokenizer/, image_processor/  built with data.py helpers, so nothing is ever downloaded
  meta.json            settings, counts, held-out combos, vocabulary (and the rules of a world other than the default)
Image paths are relative to the output directory.

Grammar. A noun phrase (NP) is "[size] [color] shape". Captions are relational, "a NP left of a NP" (relations: left
of / right of / above / below), or lists, "a NP , a NP and a NP". All text is lower case with punctuation as separate
words; the article is always "a" (even "a orange circle"), so no article betrays the next word.

Pitfalls this world avoids (each would let text alone, or a caption's length, pick the answer):
  * Relations are only stated along an axis where the two objects really differ, and both orders
    ("A left of B" and "B right of A") are sampled, so the relation word is never a text shortcut.
  * CR negatives obey the world's rules (no repeated colour or shape in a caption; replacements are
    drawn from attributes absent from the image), so text alone cannot reject them.
  * add_obj is length-matched: the last listed object is replaced by an absent one instead of
    appending one, so a likelihood scorer cannot win by length. (add_att, as in SugarCrepe, adds one
    word; report the shuffled-image control beside it.)
  * POPE files are exactly balanced yes/no; training yes/no questions by a fair coin per question.
Determinism: every image and sample draws from its own random.Random seeded by a string ("{seed}/{stream}/{index}"),
so files are byte-identical for a seed and a smaller run is a prefix of a larger one. Test images use separate
streams from training images.

WORLDS holds the rules of each world. The hard world keeps the grammar, the tests and their pitfalls and changes what
a visual token carries: 36 tokens over a 4x4 grid that does not line up with them, 3-5 objects, grey clutter, and a
tower that names only what each patch itself shows (tower_labels="blocks+shape"), so binding a colour to a shape
means gathering several tokens. Why, and what it costs: docs/shapes.md. label_map (which object covers which pixels)
is the world's geometry, read by the tower's labels (shapes_tower.py) and the teacher's privileged supervision
(privileged.py).
"""
import json
import math
import os
import random
from collections import Counter

from PIL import Image, ImageDraw
from tqdm import tqdm

COLORS = {"red": (230, 30, 30), "green": (40, 200, 40), "blue": (40, 90, 255), "yellow": (250, 230, 0),
          "purple": (160, 50, 230), "orange": (255, 140, 0), "white": (245, 245, 245), "cyan": (0, 220, 220)}
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star"]
SIZES = {"small": 0.24, "large": 0.42}  # radius as a fraction of the cell side
# Mildly skewed frequencies, so POPE's "popular" split (most frequent training objects) means something.
COLOR_WEIGHTS = [1.4, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7]
SHAPE_WEIGHTS = [1.3, 1.2, 1.1, 1.0, 0.9, 0.8]
HELD_OUT = [("red", "star"), ("green", "triangle"), ("blue", "diamond"), ("yellow", "cross")]
RELATIONS = {"left": "right", "right": "left", "above": "below", "below": "above"}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]
PROMPT = "describe the image ."
CR_SUBSETS = ["swap_att", "replace_att", "replace_obj", "replace_rel", "swap_obj", "add_obj", "add_att"]
POPE_SPLITS = ["random", "popular", "adversarial"]
YES_NO_KINDS = ("exist", "rel_yn")
REEFKNOT_FILES = ["YESNO", "Multichoice", "VQA"]  # Reefknot's own file names; the world trains and writes YESNO
SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges, still deterministic
CLUTTER_COLOR, CLUTTER_RADIUS = (120, 120, 120), (1.0, 1.8)  # grey specks (hard world): no word names them
CLUTTER_ID = 1 + len(COLORS)  # the specks' class in label_map (0 = background, 1..8 = an object's colour)
SUB = 4  # patch-evidence tower: each patch is labelled as SUB x SUB blocks (8 px patches -> 2 px blocks)
# What the world's tower is pretrained to name: "cell" (default world: each cell's colour, shape, size, row, column);
# "blocks" (per patch: what covers each of its SUB x SUB blocks, and where the patch is); "blocks+shape" (the same,
# plus the shape of the object covering most of the patch). shapes_tower.py makes the labels; docs/shapes.md says
# why the hard world uses the last one.
TOWER_LABELS = ("cell", "blocks", "blocks+shape")
# The instruction mix: question-kind weights, and turns per conversation (1..3, with these weights).
MIX = dict(weights=dict(color=12, binding=12, size=6, exist=14, count=8, rel_yn=20, rel_query=14, position=14),
           turns=[5, 3, 2])


# The world's rules. "default" is the world of run_shapes.sh and the committed results; "hard" is the world where a
# model has to look in the right place (module docstring). generate(**WORLDS[name]) builds one.
WORLDS = {
    "default": dict(image_size=48, grid=3),
    "hard": dict(image_size=48, grid=4, n_objects=(3, 5), sizes={"small": 0.36, "large": 0.46}, clutter=(1, 3),
                 patch_size=8, tower_labels="blocks+shape"),
}


def position_words(grid):
    """Names of rows and columns, or None when the grid is too fine to name cells in words."""
    return {2: (["top", "bottom"], ["left", "right"]),
            3: (["top", "middle", "bottom"], ["left", "center", "right"])}.get(grid)


def vocabulary(grid=3):
    """Every word any generated text can contain (checked against the real texts in generate)."""
    words = set(COLORS) | set(SHAPES) | set(SIZES) | set(RELATIONS) | set(NUMBERS)
    words |= set("a the and of , ? . what color shape size is there in image how many objects object are "
                 "yes no where nothing describe say colors shapes comes after opposite".split())
    if position_words(grid):
        words |= set(sum(position_words(grid), []))
    # evaluate.py's multiple-choice prompt; never in training text, but better distinct words than <unk>
    words |= set("which caption describes answer with or b ( )".split())
    return sorted(words)


# ----------------------------------------------------------------------------- scenes and rendering
def _weighted_sample(rng, items, weights, k, exclude=()):
    """k distinct items drawn with the given weights (without replacement)."""
    pool = [(x, w) for x, w in zip(items, weights) if x not in exclude]
    out = []
    for _ in range(k):
        x = rng.choices([p[0] for p in pool], [p[1] for p in pool])[0]
        out.append(x)
        pool = [p for p in pool if p[0] != x]
    return out


def sample_scene(rng, grid, image_size, forced=None, forbid=(), n_objects=(2, 4), sizes=SIZES):
    """`n_objects` (min, max) objects in distinct cells; unique colours and shapes; `forced` (color, shape)
    included, no object's (color, shape) in `forbid` (training scenes forbid the held-out combos)."""
    while True:
        n = rng.randint(n_objects[0], min(n_objects[1], grid * grid))
        cells = rng.sample(range(grid * grid), n)
        first = [forced] if forced else []
        colors = [c for c, _ in first] + _weighted_sample(rng, list(COLORS), COLOR_WEIGHTS, n - len(first),
                                                          exclude=[c for c, _ in first])
        kinds = [s for _, s in first] + _weighted_sample(rng, SHAPES, SHAPE_WEIGHTS, n - len(first),
                                                          exclude=[s for _, s in first])
        if not any((c, s) in forbid for c, s in zip(colors, kinds)):
            break
    cell = image_size / grid
    objects = []
    for cell_id, color, shape in zip(cells, colors, kinds):
        size = rng.choice(list(sizes))
        r = sizes[size] * cell
        slack = max(0.0, cell / 2 - r - 1) * 0.6  # jitter, but never out of the cell
        row, col = divmod(cell_id, grid)
        x = (col + 0.5) * cell + rng.uniform(-slack, slack)
        y = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append(dict(color=color, shape=shape, size=size, row=row, col=col,
                            x=round(x, 2), y=round(y, 2), r=round(r, 2)))
    rng.shuffle(objects)
    return objects


def _polygon(shape, x, y, r):
    if shape == "triangle":
        return [(x, y - r), (x + 0.95 * r, y + 0.75 * r), (x - 0.95 * r, y + 0.75 * r)]
    if shape == "diamond":
        return [(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)]
    if shape == "cross":
        t = 0.33 * r
        return [(x - t, y - r), (x + t, y - r), (x + t, y - t), (x + r, y - t), (x + r, y + t), (x + t, y + t),
                (x + t, y + r), (x - t, y + r), (x - t, y + t), (x - r, y + t), (x - r, y - t), (x - t, y - t)]
    if shape == "star":
        return [(x + rad * math.sin(k * math.pi / 5), y - rad * math.cos(k * math.pi / 5))
                for k in range(10) for rad in [r if k % 2 == 0 else 0.45 * r]]
    raise ValueError(shape)


def _draw(draw, o, s, fill):
    x, y, r = o["x"] * s, o["y"] * s, o["r"] * s
    if o["shape"] == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif o["shape"] == "square":
        h = 0.82 * r
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    else:
        draw.polygon(_polygon(o["shape"], x, y, r), fill=fill)


def render(objects, image_size, clutter=()):
    """Filled shapes (then clutter specks) on black, drawn at SUPERSAMPLE x resolution and box-filtered down."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (image_size * s, image_size * s), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for o in objects:
        _draw(draw, o, s, COLORS[o["color"]])
    for c in clutter:
        _draw(draw, dict(c, shape="circle"), s, CLUTTER_COLOR)
    return img.resize((image_size, image_size), Image.BOX)


def sample_clutter(rng, objects, grid, image_size, k):
    """`k` (min, max) grey specks, each inside its own empty cell (so never touching an object's cell interior):
    things in the image that no text names, which a model has to learn to look past."""
    used = {o["row"] * grid + o["col"] for o in objects}
    empty = [c for c in range(grid * grid) if c not in used]
    cell, out = image_size / grid, []
    for c in rng.sample(empty, min(len(empty), rng.randint(*k))):
        row, col = divmod(c, grid)
        r = rng.uniform(*CLUTTER_RADIUS)
        m = cell / 2 - r - 1  # keep the speck inside its cell
        out.append(dict(x=round((col + 0.5) * cell + rng.uniform(-m, m), 2),
                        y=round((row + 0.5) * cell + rng.uniform(-m, m), 2), r=round(r, 2)))
    return out


def label_map(objects, image_size, block, clutter=()):
    """What covers each `block` x `block` px square of the image, by majority of its (supersampled) pixels, ties to
    the lower id: 0 background, 1 + the COLORS index for an object, CLUTTER_ID for a speck. (H/block, W/block) ints."""
    import numpy as np
    s, n = SUPERSAMPLE, image_size // block
    img = Image.new("L", (image_size * s, image_size * s), 0)
    draw = ImageDraw.Draw(img)
    for o in objects:
        _draw(draw, o, s, 1 + list(COLORS).index(o["color"]))
    for c in clutter:
        _draw(draw, dict(c, shape="circle"), s, CLUTTER_ID)
    a = np.asarray(img).reshape(n, block * s, n, block * s).transpose(0, 2, 1, 3).reshape(n, n, -1)
    counts = (a[..., None] == np.arange(CLUTTER_ID + 1)).sum(2)
    return counts.argmax(-1)


# ----------------------------------------------------------------------------- text: grammar and truth
def relation(a, b):
    """Relation words that hold for "a REL b" (only along axes where the two objects differ)."""
    rels = []
    if a["col"] != b["col"]:
        rels.append("left" if a["col"] < b["col"] else "right")
    if a["row"] != b["row"]:
        rels.append("above" if a["row"] < b["row"] else "below")
    return rels


def rel_text(rel):
    return rel + " of" if rel in ("left", "right") else rel


def np_text(np):
    return " ".join(w for w in (np.get("size"), np.get("color"), np["shape"]) if w)


def make_np(rng, o, color=None, size=None):
    """An NP for object o; color/size: True = include, False = omit, None = random."""
    color = rng.random() < 0.85 if color is None else color
    size = rng.random() < 0.3 if size is None else size
    return dict(shape=o["shape"], color=o["color"] if color else None, size=o["size"] if size else None)


def relational_caption(a_np, rel, b_np):
    return f"a {np_text(a_np)} {rel_text(rel)} a {np_text(b_np)}"


def list_caption(nps):
    parts = ["a " + np_text(n) for n in nps]
    return parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]


def parse_caption(caption):
    """Inverse of the caption grammar: (list of NP dicts, relation word or None)."""
    words = caption.split()
    rel = next((w for w in words if w in RELATIONS), None)
    chunks, cur = [], []
    for w in words:
        if w in ("a", ",", "and", "of") or w in RELATIONS:
            if cur:
                chunks.append(cur)
            cur = []
        else:
            cur.append(w)
    chunks.append(cur)
    nps = [dict(shape=c[-1], color=next((w for w in c if w in COLORS), None),
                size=next((w for w in c if w in SIZES), None)) for c in chunks]
    return nps, rel


def _matches(np, o):
    return all(np[k] is None or np[k] == o[k] for k in ("shape", "color", "size"))


def caption_true(caption, objects):
    """Is the caption true of the scene? Every NP names an object; the relation holds."""
    nps, rel = parse_caption(caption)
    found = [[o for o in objects if _matches(np, o)] for np in nps]
    if not all(found):
        return False
    if rel is None:
        return len({np["shape"] for np in nps}) == len(nps)
    return any(rel in relation(a, b) for a in found[0] for b in found[1] if a is not b)


def obeys_rules(caption):
    """Colours and shapes never repeat within an image, so they must not repeat within a caption."""
    nps, _ = parse_caption(caption)
    colors = [n["color"] for n in nps if n["color"]]
    return len(set(colors)) == len(colors) and len({n["shape"] for n in nps}) == len(nps)


def name(o):
    return f"{o['color']} {o['shape']}"


# ----------------------------------------------------------------------------- training texts
def pretrain_caption(rng, objects):
    """70 % relational (random order, random valid axis), 30 % a list of all objects in random order."""
    if rng.random() < 0.7:
        a, b = rng.sample(objects, 2)
        return relational_caption(make_np(rng, a), rng.choice(relation(a, b)), make_np(rng, b))
    return list_caption([make_np(rng, o) for o in rng.sample(objects, len(objects))])


def question(rng, objects, grid, kind=None):
    """One (question, answer, kind) about the scene, of a kind drawn by MIX's weights unless given. Yes/no kinds are
    balanced by a coin flip."""
    weights = dict(MIX["weights"])
    if not position_words(grid):
        weights.pop("position", None)
    kind = kind or rng.choices(list(weights), list(weights.values()))[0]
    o = rng.choice(objects)
    if kind == "color":
        return f"what color is the {o['shape']} ?", o["color"], kind
    if kind == "binding":
        return f"what shape is {o['color']} ?", o["shape"], kind
    if kind == "size":
        return f"what size is the {name(o)} ?", o["size"], kind
    if kind == "exist":
        present = {(p["color"], p["shape"]) for p in objects}
        form = rng.choice(["combo", "combo", "shape", "color"])
        if rng.random() < 0.5:  # yes
            q = {"combo": name(o), "shape": o["shape"], "color": o["color"] + " object"}[form]
            return f"is there a {q} in the image ?", "yes", kind
        if form == "shape":
            q = rng.choice([s for s in SHAPES if s not in {p["shape"] for p in objects}])
        elif form == "color":
            q = rng.choice([c for c in COLORS if c not in {p["color"] for p in objects}]) + " object"
        else:  # half of the absent combos are binding foils: colour and shape both present, not together
            foils = [(p["color"], s["shape"]) for p in objects for s in objects if p is not s]
            pool = foils if rng.random() < 0.5 else [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            q = " ".join(rng.choice(pool))
        return f"is there a {q} in the image ?", "no", kind
    if kind == "count":
        if rng.random() < 0.5:
            return "how many objects are there ?", NUMBERS[len(objects)], kind
        size = rng.choice(list(SIZES))
        return f"how many {size} objects are there ?", NUMBERS[sum(p["size"] == size for p in objects)], kind
    if kind == "rel_yn":
        a, b = rng.sample(objects, 2)
        rel = rng.choice(relation(a, b))
        yes = rng.random() < 0.5
        a_np, b_np = (make_np(rng, x, size=False, color=rng.random() < 0.7) for x in (a, b))
        q = f"is the {np_text(a_np)} {rel_text(rel if yes else RELATIONS[rel])} the {np_text(b_np)} ?"
        return q, "yes" if yes else "no", kind
    if kind == "rel_query":  # only (reference, relation) pairs with exactly one answer
        options = [(b, rel, [a for a in objects if rel in relation(a, b)]) for b in objects for rel in RELATIONS]
        options = [t for t in options if len(t[2]) == 1]
        if not options:  # e.g. four objects in a 2x2 block: every side holds two or none
            return question(rng, objects, grid, "rel_yn")
        b, rel, ans = rng.choice(options)
        return f"what is {rel_text(rel)} the {np_text(make_np(rng, b, size=False))} ?", name(ans[0]), kind
    rows, cols = position_words(grid)
    if rng.random() < 0.5:
        return f"where is the {np_text(make_np(rng, o, size=False))} ?", f"{rows[o['row']]} {cols[o['col']]}", kind
    cell = rng.randrange(grid * grid)
    here = [p for p in objects if p["row"] * grid + p["col"] == cell]
    return f"what is in the {rows[cell // grid]} {cols[cell % grid]} ?", name(here[0]) if here else "nothing", kind


def text_only(rng):
    """World trivia without an image (the 2 % text-only share of instruction data)."""
    k = rng.randrange(5)
    if k == 0:
        w = rng.choice(list(COLORS) + SHAPES)
        cat = rng.choice(["color", "shape"])
        return f"is {w} a {cat} ?", "yes" if (w in COLORS) == (cat == "color") else "no"
    if k == 1:
        cat = rng.choice(["colors", "shapes"])
        return f"how many {cat} are there ?", NUMBERS[len(COLORS) if cat == "colors" else len(SHAPES)]
    if k == 2:
        i = rng.randrange(len(NUMBERS) - 1)
        return f"what comes after {NUMBERS[i]} ?", NUMBERS[i + 1]
    if k == 3:
        w = rng.choice(list(RELATIONS) + list(SIZES))
        return f"what is the opposite of {w} ?", RELATIONS.get(w) or ("large" if w == "small" else "small")
    w = rng.choice(["yes", "no"])
    return f"say {w} .", w


def conversation(rng, objects, grid):
    """1-3 turns (50/30/20 %); the first human turn carries the image placeholder."""
    turns, seen = [], set()
    n = MIX["turns"]
    for t in range(rng.choices(list(range(1, len(n) + 1)), n)[0]):
        q, a, _ = question(rng, objects, grid)
        if q in seen:
            continue
        seen.add(q)
        turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
    return turns


# ----------------------------------------------------------------------------- test sets
def cr_item(rng, subset, objects):
    """(caption, negative) for one SugarCrepe subset; the negative differs in exactly the named way."""
    colors_here = {o["color"] for o in objects}
    shapes_here = {o["shape"] for o in objects}
    absent_color = rng.choice([c for c in COLORS if c not in colors_here])
    absent_shape = rng.choice([s for s in SHAPES if s not in shapes_here])
    if subset == "add_obj":  # length-matched: replace the last listed object by an absent one
        nps = [make_np(rng, o) for o in rng.sample(objects, len(objects))]
        new = dict(nps[-1], shape=absent_shape)
        new["color"] = absent_color if new["color"] else None
        return list_caption(nps), list_caption(nps[:-1] + [new])
    a, b = rng.sample(objects, 2)
    rel = rng.choice(relation(a, b))
    both_colors = subset in ("swap_att", "swap_obj", "replace_att")
    a_np, b_np = (make_np(rng, o, color=True if both_colors else None) for o in (a, b))
    pos = relational_caption(a_np, rel, b_np)
    i = rng.randrange(2)
    nps = [dict(a_np), dict(b_np)]
    if subset == "swap_att":
        nps[0]["color"], nps[1]["color"] = b_np["color"], a_np["color"]
    elif subset == "swap_obj":
        nps[0]["shape"], nps[1]["shape"] = b_np["shape"], a_np["shape"]
    elif subset == "replace_att":
        nps[i]["color"] = absent_color
    elif subset == "replace_obj":
        nps[i]["shape"] = absent_shape
    elif subset == "replace_rel":  # "A left of B" -> "A right of B": false, since they differ on that axis
        return pos, relational_caption(a_np, RELATIONS[rel], b_np)
    elif subset == "add_att":  # the positive omits one attribute; the negative adds a wrong one
        attr = rng.choice(["color", "size"])
        wrong = absent_color if attr == "color" else {"small": "large", "large": "small"}[(a, b)[i]["size"]]
        pos_nps = [dict(a_np), dict(b_np)]
        pos_nps[i][attr] = None
        nps = [dict(n) for n in pos_nps]
        nps[i][attr] = wrong
        return relational_caption(pos_nps[0], rel, pos_nps[1]), relational_caption(nps[0], rel, nps[1])
    else:
        raise ValueError(subset)
    return pos, relational_caption(nps[0], rel, nps[1])


def reefknot_items(rng, objects, image_id):
    """Relation-hallucination items for one test image in Reefknot's YESNO layout ({image_id, query_prompt, label,
    relation_type}; spatial relations are Reefknot's "perception" kind), phrased as the training questions: a pair
    of questions on one object pair, the true relation (yes) and its opposite on the same axis (no: both objects are
    there, only the relation is false)."""
    item = lambda q, label: dict(image_id=image_id, query_prompt=q, label=label, relation_type="perception")
    a, b = rng.sample(objects, 2)
    rel = rng.choice(relation(a, b))
    return [item(f"is the {name(a)} {rel_text(rel)} the {name(b)} ?", "yes"),
            item(f"is the {name(a)} {rel_text(RELATIONS[rel])} the {name(b)} ?", "no")]


def pope_items(rng, objects, freq):
    """One present and one absent object per image, for each split:
    random = an absent combo, uniformly; popular = one of the 3 absent combos most frequent in training
    images (as POPE takes the top-k frequent objects);
    adversarial = an absent combo whose colour AND shape are both in the image (a binding foil)."""
    present = {(o["color"], o["shape"]) for o in objects}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    yes = name(rng.choice(objects))
    no = {"random": " ".join(rng.choice(absent)),
          "popular": " ".join(rng.choice(sorted(absent, key=lambda cs: (-freq[cs], cs))[:3])),
          "adversarial": " ".join(rng.choice([(p["color"], q["shape"]) for p in objects for q in objects if p is not q]))}
    return yes, no


# ----------------------------------------------------------------------------- writing
def _write(path, obj):
    """Sorted keys and fixed formatting, so equal content gives equal bytes; *.jsonl = one row per line."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if path.endswith(".jsonl"):
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in obj)
        else:
            f.write(json.dumps(obj, sort_keys=True, indent=1) + "\n")


def generate(out, seed=0, n_train=4000, n_test=200, image_size=48, grid=3, text_only_frac=0.02, progress=True,
             n_objects=(2, 4), sizes=None, clutter=(0, 0), patch_size=0, tower_labels="cell"):
    """Write the whole world under `out` and return its meta dict (also saved as meta.json). The keywords after
    `progress` are the world's rules (WORLDS holds the presets); patch_size and tower_labels are stored in
    meta.json for shapes_tower.pretrain_tower and the tests. The default world's meta.json holds no rules."""
    sizes = dict(sizes or SIZES)
    if grid < 2 or image_size < 8 * grid:
        raise ValueError(f"shapes world: need grid >= 2 and image_size >= 8 * grid, got grid={grid}, image_size={image_size}")
    most = min(len(SHAPES) - 1, grid * grid)  # unique shapes, and one always absent (negatives, "no" answers)
    if not 2 <= n_objects[0] <= n_objects[1] <= most or list(sizes) != list(SIZES):
        raise ValueError(f"shapes world: n_objects={n_objects} must lie in 2..{most} (shapes are unique in an image "
                         f"and one must stay absent), and sizes must name {list(SIZES)}")
    if tower_labels not in TOWER_LABELS or (tower_labels.startswith("blocks") and (not patch_size or patch_size % SUB)):
        raise ValueError(f"shapes world: tower_labels={tower_labels!r} / patch_size={patch_size}: use 'cell', or "
                         f"{TOWER_LABELS[1:]} with a patch size divisible by {SUB}")
    world = dict(n_objects=list(n_objects), sizes=sizes, clutter=list(clutter), patch_size=patch_size,
                 tower_labels=tower_labels)
    default_world = world == dict(n_objects=[2, 4], sizes=SIZES, clutter=[0, 0], patch_size=0, tower_labels="cell")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    bar = lambda it, desc: tqdm(it, desc=desc, disable=not progress, leave=False)
    R = lambda *key: random.Random("/".join(map(str, (seed,) + key)))
    scenes, pretrain, instruct = {}, [], []
    forbid = set(HELD_OUT)
    for i in bar(range(n_train), "train images"):
        path = f"images/train_{i:05d}.png"
        objects = sample_scene(R("train", i), grid, image_size, forbid=forbid, n_objects=n_objects, sizes=sizes)
        specks = sample_clutter(R("clutter", "train", i), objects, grid, image_size, clutter) if clutter[1] else []
        scenes[path] = dict(split="train", objects=objects, **({"clutter": specks} if clutter[1] else {}))
        render(objects, image_size, specks).save(os.path.join(out, path), format="PNG", compress_level=1)
        cap = pretrain_caption(R("pretrain", i), objects)
        pretrain.append({"id": f"train_{i:05d}", "image": path, "conversations": [
            {"from": "human", "value": "<image>\n" + PROMPT}, {"from": "gpt", "value": cap}]})
        instruct.append({"id": f"train_{i:05d}", "image": path, "conversations": conversation(R("instruct", i), objects, grid)})
    n_text = round(text_only_frac * n_train)
    for k in range(n_text):  # spread through the file so a sequential reader meets them too
        q, a = text_only(R("text", k))
        instruct.insert(k * n_train // n_text + k, {"id": f"text_{k:05d}", "conversations": [
            {"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    freq = Counter((o["color"], o["shape"]) for s in scenes.values() for o in s["objects"])

    vqa_kinds = [k for k in MIX["weights"] if k != "position" or position_words(grid)]
    vqa, cr, pope = [], {s: {} for s in CR_SUBSETS}, {s: [] for s in POPE_SPLITS}
    reefknot = {"YESNO": []}
    for i in bar(range(n_test), "test images"):
        path = f"images/test_{i:05d}.png"
        forced = HELD_OUT[(i // 2) % len(HELD_OUT)] if i % 2 == 0 else None  # half carry a held-out combo
        objects = sample_scene(R("test", i), grid, image_size, forced=forced, n_objects=n_objects, sizes=sizes)
        specks = sample_clutter(R("clutter", "test", i), objects, grid, image_size, clutter) if clutter[1] else []
        scenes[path] = dict(split="test", objects=objects, **({"clutter": specks} if clutter[1] else {}))
        render(objects, image_size, specks).save(os.path.join(out, path), format="PNG", compress_level=1)
        for kind in vqa_kinds:  # one question of every kind the mix asks, so each kind has n_test items
            q, a, _ = question(R("vqa", i, kind), objects, grid, kind)
            row = {"id": f"test_{i:05d}_{kind}", "question": q, "answer": a, "image": path, "type": kind}
            if kind in YES_NO_KINDS:  # VQAv2's answer_type; evaluate.py's verdict figure reads the verdict
                row.update(answer=a.split()[-1], answer_type="yes/no")
            vqa.append(row)
        for subset in CR_SUBSETS:
            pos, neg = cr_item(R("cr", subset, i), subset, objects)
            cr[subset][str(i)] = {"filename": path, "caption": pos, "negative_caption": neg}
        reefknot["YESNO"] += reefknot_items(R("reefknot", i), objects, f"test_{i:05d}")
        yes, no = pope_items(R("pope", i), objects, freq)
        for split in POPE_SPLITS:
            for obj, ans in ((yes, "yes"), (no[split], "no")):
                pope[split].append({"question": f"is there a {obj} in the image ?", "answer": ans,
                                    "image": path, "category": split, "object": obj})

    # Remove what an earlier run into the same directory left that this one does not write: images of a larger run,
    # Reefknot files in formats this world does not write (their labels would be scored against these images).
    for f in os.listdir(os.path.join(out, "images")):
        if f"images/{f}" not in scenes:
            os.remove(os.path.join(out, "images", f))
    for name in REEFKNOT_FILES:
        if not reefknot.get(name) and os.path.isfile(os.path.join(out, "test", "reefknot", f"{name}.jsonl")):
            os.remove(os.path.join(out, "test", "reefknot", f"{name}.jsonl"))
    files = {"pretrain.json": pretrain, "instruct.json": instruct, "scenes.json": scenes, "test/vqa.jsonl": vqa,
             **{f"test/cr/{s}.json": items for s, items in cr.items()},
             **{f"test/pope_{s}.jsonl": rows for s, rows in pope.items()},
             **{f"test/reefknot/{k}.jsonl": rows for k, rows in reefknot.items() if rows}}
    for rel_path, obj in files.items():
        _write(os.path.join(out, rel_path), obj)

    # The tokenizer covers the grammar's whole vocabulary; check the real texts against it.
    vocab = vocabulary(grid)
    texts = [t["value"] for s in pretrain + instruct for t in s["conversations"]]
    texts += [r["question"] + " " + r["answer"] for r in vqa + sum(pope.values(), [])]
    texts += [v[k] for items in cr.values() for v in items.values() for k in ("caption", "negative_caption")]
    texts += [r["query_prompt"] + " " + r["label"].lower() for rows in reefknot.values() for r in rows]
    unknown = {w for t in texts for w in t.replace("<image>", " ").split()} - set(vocab)
    if unknown:  # a grammar edit that forgot vocabulary(): fail here, not as <unk> in training
        raise RuntimeError(f"shapes.vocabulary() misses words the generator used: {sorted(unknown)}")
    from data import image_processor, word_tokenizer  # the project's own builders: no downloads
    tok = word_tokenizer(vocab)
    tok.save_pretrained(os.path.join(out, "tokenizer"))
    image_processor(image_size).save_pretrained(os.path.join(out, "image_processor"))

    meta = dict(seed=seed, n_train=n_train, n_test=n_test, image_size=image_size, grid=grid,
                colors={c: list(v) for c, v in COLORS.items()}, shapes=SHAPES, sizes=sizes,
                held_out=[list(h) for h in HELD_OUT], prompt=PROMPT, vocab=vocab, vocab_size=len(tok),
                counts=dict(train_images=n_train, test_images=n_test, pretrain=len(pretrain),
                            instruct=len(instruct), instruct_text_only=n_text, vqa=len(vqa),
                            **{f"cr_{s}": len(v) for s, v in cr.items()},
                            **{f"pope_{s}": len(v) for s, v in pope.items()},
                            **{f"reefknot_{k.lower()}": len(v) for k, v in reefknot.items() if v}),
                pope_definitions=pope_items.__doc__.split("\n", 1)[1].strip(),
                image_paths="relative to this directory (also in test/*)")
    if not default_world:  # the default world's meta.json has no "world" entry: no rules differ
        meta["world"] = world
    _write(os.path.join(out, "meta.json"), meta)
    return meta


def shuffled_control(src, dst, seed=0):
    """The text-only control: a copy of the world's test sets at `src` in which every test image is replaced by
    another test image (a fixed derangement), consistently across VQA, CR, POPE and Reefknot. A score that holds up
    here came from the text, not the image. Images are linked, not copied."""
    with open(os.path.join(src, "scenes.json")) as f:
        tests = sorted(p for p, s in json.load(f).items() if s["split"] == "test")
    rng, perm = random.Random(f"{seed}/control"), list(tests)
    while any(a == b for a, b in zip(tests, perm)):
        rng.shuffle(perm)
    other = dict(zip(tests, perm))
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]
    other_id = {stem(a): stem(b) for a, b in other.items()}
    os.makedirs(os.path.join(dst, "test", "cr"), exist_ok=True)
    if not os.path.exists(os.path.join(dst, "images")):
        os.symlink(os.path.abspath(os.path.join(src, "images")), os.path.join(dst, "images"))
    for root, _, files in os.walk(os.path.join(src, "test")):
        for f in files:
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)
            if f.endswith(".jsonl"):
                with open(path) as fh:
                    rows = [json.loads(line) for line in fh if line.strip()]
                for r in rows:
                    if "image" in r:
                        r["image"] = other[r["image"]]
                    if "image_id" in r:
                        r["image_id"] = other_id[r["image_id"]]
                _write(os.path.join(dst, rel), rows)
            else:
                with open(path) as fh:
                    items = json.load(fh)
                _write(os.path.join(dst, rel), {k: dict(v, filename=other[v["filename"]]) for k, v in items.items()})


# ----------------------------------------------------------------------------- command line
DEFAULTS = dict(
    world="default",          # the world's rules: a name in shapes.WORLDS (default | hard)
    out="",                   # where to write it ("": out/shapes for the default world, out/shapes_<world> else)
    seed=0,                   # every image and text draws from a stream seeded by it
    n_train=4000,             # training images (one caption and one conversation each)
    n_test=200,               # test images (the VQA, CR, POPE and Reefknot items are about them)
    tower_steps=800,          # pretraining steps of the world's vision tower (shapes_tower.py; 0: no tower)
    control_of="",            # instead: write to `out` the test sets of the world in this folder with their images
                              # shuffled among the items (the text-only control; shuffled_control)
)


def main(argv=None):
    import sys
    from configurator import configure
    cfg = configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv, __doc__, [__file__])
    if cfg["world"] not in WORLDS:
        raise ValueError(f"--world={cfg['world']}: use one of {list(WORLDS)}")
    out = cfg["out"] or ("out/shapes" if cfg["world"] == "default" else f"out/shapes_{cfg['world']}")
    if cfg["control_of"]:
        if not cfg["out"]:
            raise ValueError("--control_of needs --out: the folder the shuffled test sets go to")
        shuffled_control(cfg["control_of"], out, cfg["seed"])
        print(f"the test sets of {cfg['control_of']} with shuffled images -> {out}")
        return None
    meta = generate(out, seed=cfg["seed"], n_train=cfg["n_train"], n_test=cfg["n_test"], **WORLDS[cfg["world"]])
    print(json.dumps(meta["counts"]), f"vocab_size={meta['vocab_size']}", f"-> {out}")
    if cfg["tower_steps"]:  # the one import of shapes_tower here, and only in the CLI: shapes_tower reads the world
        from shapes_tower import pretrain_tower   # (shapes), never the other way round at import time
        acc = pretrain_tower(out, os.path.join(out, "vision_tower"), steps=cfg["tower_steps"], seed=cfg["seed"])
        print("vision tower test accuracy:", json.dumps({k: round(v, 4) for k, v in acc.items() if v is not None}),
              f"-> {out}/vision_tower")
    return meta


if __name__ == "__main__":
    from configurator import cli
    cli(main)
