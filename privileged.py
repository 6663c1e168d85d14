"""
Privileged supervision of the shapes teacher: while the *teacher* learns, it is told where to look and where things
are, from the world's own records (scenes.json). The teacher is the experiment's device: the question the project
asks is whether a student inherits what a teacher knows, so the teacher may be given whatever makes it know more.
Students never receive any of this: they only see the teacher's outputs and attention, as in the paper, and the
training loop refuses these settings in a distilling stage.

Why it is needed. Trained on answers alone, a small teacher learns what one look keyed on the current word can
answer (which shape is red) and fails whenever the question's objects must be found first (what colour is the star,
is there a red star, is A left of B): a yes/no verdict gives no gradient toward the right look until the look is
right. Two signals break that circle:

  look     a KL loss between chosen attention heads' distribution over the N_v image tokens, plus one "elsewhere"
           bin (the mass on every other key), and a target distribution:
             noun-phrase heads (np_layers x np_heads): at each size / colour / shape word, the objects that match
             the noun phrase read so far ("large red" -> every large red object); none -> all mass on elsewhere;
             answer heads (answer_layers x answer_heads, two heads: subject and reference): at each position that
             predicts an answer token, the objects the question is about - the two objects of a relation, the
             object asked about (both heads), for existence the objects of the asked colour and of the asked
             shape, for "what is left of B" the answer and B; in captions, the object being described and, after
             a relation word, the other one;
             optionally a relation head (relation_head): at the same positions of a question that names a
             relation, one more head of the answer layers is pulled to that relation word.
  readout  a training-only Linear on the output of decoder layer `readout_layer`, at the same answer positions:
           the row and column of the subject and of the reference, and on each axis on which side of the reference
           the subject lies. The layer's output must then say *where* the looked-at objects are, which the answer
           heads alone copy poorly (they copy colour, shape and size). It is not part of the model: nothing of it
           is saved in the checkpoint or used at inference.

An object's target over the image tokens is the share of its pixels each patch holds (one-hot on its cell in the
default world, where a patch is a cell); several objects share the mass equally.

    python train_sft.py config/shapes_teacher.py          # the preset turns both on (look_weight, readout_weight)
    python train_sft.py config/shapes_teacher.py config/shapes_teacher_it.py   # run 2 adds the relation head
"""
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import attention_distill as ad
from data import IGNORE_INDEX
from shapes import COLORS, PROMPT, RELATIONS, SHAPES, label_map, position_words

SIZE_WORDS = ("small", "large")
_COLORS, _SHAPES, _RELATIONS = set(COLORS), set(SHAPES), set(RELATIONS)
CELL_QUESTION = ["what", "is", "in", "the"]  # the question that names a cell by its row and column words
SIDES = 3  # a subject lies before (left of / above), level with, or after (right of / below) its reference


@dataclass
class PrivilegedSettings:
    """Which heads are told where to look and where the readout reads (0-based layer indices; `privileged` setting
    overrides any of them)."""
    np_layers: tuple = (1, 2)        # layers whose np_heads follow the noun phrase being read
    np_heads: tuple = (0,)
    answer_layers: tuple = (2, 3)    # layers whose two answer_heads look at the question's subject and reference
    answer_heads: tuple = (1, 2)
    readout_layer: int = 3           # the decoder layer whose output the readout reads
    relation_head: int = -1          # >= 0: this head of answer_layers, at the answer positions of a question that
                                     # names a relation, is pulled to that relation word (-1: off)
    captions: bool = True            # answer heads and readout at caption tokens too (else questions only)
    place_words: bool = False        # np_heads also at the place words of "what is in the <row> <col> ?": at the row
                                     # word that row's objects, at the column word the cell's (or "elsewhere": empty)

    @classmethod
    def from_config(cls, overrides):
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"privileged={overrides}: unknown keys {sorted(unknown)}; use "
                             f"{', '.join(cls.__dataclass_fields__)}")
        s = cls(**overrides)
        if len(s.answer_heads) != 2:
            raise ValueError(f"privileged answer_heads={s.answer_heads}: give two heads (subject, reference)")
        return s


# -----------------------------------------------------------------------------
# targets from the scene: which objects a text is about


def _np_match(words, objects):
    """Indices of the objects matching the noun-phrase words (size, colour, shape; any subset)."""
    return [i for i, o in enumerate(objects)
            if all(o["size"] == w if w in SIZE_WORDS else o["color"] == w if w in _COLORS else o["shape"] == w
                   for w in words)]


def _is_np_word(w):
    return w in _COLORS or w in _SHAPES or w in SIZE_WORDS


def _np_words(text):
    return [w for w in text.split() if _is_np_word(w)]


def question_objects(question, answer, objects, grid=3):
    """(subject, reference): the object indices a question is about, each a list (empty: the thing asked about is
    absent, the look goes "elsewhere"), or None when the question names no objects the heads could look at."""
    q = question.replace("<image>", " ").split()
    text = " ".join(q)
    if text.startswith("is there a "):  # existence: the asked colour's objects and the asked shape's
        words = _np_words(text)
        color = [w for w in words if w in _COLORS]
        shape = [w for w in words if w in _SHAPES]
        a = _np_match(color or shape, objects)
        return a, _np_match(shape or color, objects)
    if text.startswith("what is in the "):  # a cell: whatever is there
        rows, cols = position_words(grid) or ((), ())
        r, c = next((w for w in q if w in rows), None), next((w for w in q if w in cols), None)
        if r is None or c is None:
            return None
        a = [i for i, o in enumerate(objects) if o["row"] == rows.index(r) and o["col"] == cols.index(c)]
        return a, a
    rel = next((w for w in q if w in _RELATIONS), None)
    if text.startswith("is the ") and rel:  # "is the A rel the B ?"
        i = q.index(rel)
        return _np_match(_np_words(" ".join(q[:i])), objects), _np_match(_np_words(" ".join(q[i:])), objects)
    if text.startswith("what is ") and rel and "between" not in q:  # "what is rel the B ?": the answer and B
        return _np_match(_np_words(answer), objects), _np_match(_np_words(" ".join(q[q.index(rel):])), objects)
    if "between" in q:  # "what is the relation between the A and the B ?"
        i = q.index("and")
        return _np_match(_np_words(" ".join(q[:i])), objects), _np_match(_np_words(" ".join(q[i:q.index("?")])),
                                                                          objects)
    if text.startswith("how many") and "objects" in q:  # every object, or every object of the asked size
        a = _np_match(_np_words(text), objects)
        return a, a
    words = _np_words(text)
    if not words:
        return None
    a = _np_match(words, objects)  # what color / shape / size is ..., where is ...
    return a, a


def caption_objects(caption, objects):
    """For each word of a caption, (subject, reference) object indices of the predicting position whose next token
    it is: the object being described while its noun phrase is written; from a relation word on, the first object
    and the second."""
    words = caption.split()
    chunks, cur, start = [], [], 0  # (first word index, last word index, matched objects) per noun phrase
    for i, w in enumerate(words + ["a"]):
        if _is_np_word(w):
            if not cur:
                start = i
            cur.append(w)
        elif cur:
            chunks.append((start, i - 1, _np_match(cur, objects)))
            cur = []
    rel = next((i for i, w in enumerate(words) if w in _RELATIONS), None)
    out = []
    for i in range(len(words) + 1):  # the last entry: the position that predicts <eos>
        if rel is not None and i >= rel and len(chunks) >= 2:
            out.append((chunks[0][2], chunks[1][2]))
            continue
        # the noun phrase this word belongs to: the first one ending at or after it (articles and commas lead in)
        k = next((c for c in chunks if c[1] >= i), chunks[-1] if chunks else None)
        out.append((k[2], k[2]) if k else None)
    return out


def world_meta(scenes_path):
    """The meta.json of the world whose scenes.json is at `scenes_path` (its image size and grid)."""
    path = os.path.join(os.path.dirname(scenes_path), "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scenes={scenes_path}: no meta.json beside it; privileged supervision reads the "
                                "shapes world (python shapes.py), set scenes to its scenes.json")
    with open(path) as f:
        return json.load(f)


class SceneTargets:
    """The privileged targets of one tokenized sample (data.LLaVADataset's `annotate`): for each position,
    np (T, N_v + 1) and answer (T, 2, N_v + 1) target distributions (rows of zeros: no target) and readout (T, 6)
    classes (IGNORE_INDEX: none): subject row, column, reference row, column, the subject's horizontal and vertical
    side of the reference. Needs a word-level tokenizer (one token per word, as the shapes world's)."""

    def __init__(self, scenes_path, tokenizer, num_image_tokens, captions=True, place_words=False):
        if not os.path.isfile(scenes_path):
            raise FileNotFoundError(f"scenes={scenes_path}: no such file; the privileged supervision reads the shapes "
                                    "world's scenes.json (python shapes.py writes it next to the data)")
        with open(scenes_path) as f:
            self.scenes = json.load(f)
        meta = world_meta(scenes_path)
        self.image_size, self.grid = meta["image_size"], meta["grid"]
        self.n_tokens = num_image_tokens
        side = int(round(num_image_tokens ** 0.5))
        if side * side != num_image_tokens or self.image_size % side:
            raise ValueError(f"{num_image_tokens} image tokens do not tile the world's {self.image_size} px images")
        self.patch = self.image_size // side
        probe = "is the large red star left of a circle ?"
        if tokenizer.convert_ids_to_tokens(tokenizer(probe, add_special_tokens=False).input_ids) != probe.split():
            raise ValueError("privileged supervision reads each token as one word of the shapes world: it needs the "
                             "world's word-level tokenizer (<data folder>/tokenizer), not this one; it is for the shapes "
                             "teacher only")
        self.tokenizer, self.captions, self.place_words = tokenizer, captions, place_words
        self._weights = {}

    def object_weights(self, image):
        """(n_objects, N_v): the share of each object's pixels in each patch."""
        if image not in self._weights:
            objects = self.scenes[image]["objects"]
            lab = label_map(objects, self.image_size, 1)  # (H, W): 1 + colour index, 0 background
            n = self.image_size // self.patch
            per_patch = lab.reshape(n, self.patch, n, self.patch).transpose(0, 2, 1, 3).reshape(n * n, -1)
            w = np.stack([(per_patch == 1 + list(COLORS).index(o["color"])).sum(1) for o in objects]).astype(float)
            self._weights[image] = torch.tensor(w / w.sum(1, keepdims=True).clip(min=1), dtype=torch.float32)
        return self._weights[image]

    def distribution(self, image, idx):
        """Target over the N_v tokens + elsewhere for the objects `idx` (empty: all on elsewhere)."""
        t = torch.zeros(self.n_tokens + 1)
        if idx:
            t[:-1] = self.object_weights(image)[idx].mean(0)
        else:
            t[-1] = 1.0
        return t

    def readout(self, objects, subj, ref):
        """The six readout classes for a (subject, reference) pair; only single objects have a place."""
        r = [IGNORE_INDEX] * 6
        a = objects[subj[0]] if len(subj) == 1 else None
        b = objects[ref[0]] if len(ref) == 1 else None
        if a:
            r[0], r[1] = a["row"], a["col"]
        if b:
            r[2], r[3] = b["row"], b["col"]
        if a and b and a is not b:
            r[4] = 1 + (a["col"] > b["col"]) - (a["col"] < b["col"])
            r[5] = 1 + (a["row"] > b["row"]) - (a["row"] < b["row"])
        return r

    def __call__(self, record, input_ids, labels):
        T, V = len(input_ids), self.n_tokens + 1
        np_t, ans_t = torch.zeros(T, V), torch.zeros(T, 2, V)
        readout = torch.full((T, 6), IGNORE_INDEX, dtype=torch.long)
        relword = torch.full((T,), IGNORE_INDEX, dtype=torch.long)  # the key position of the question's relation word
        image = record.get("image")
        if image is None:
            return dict(np=np_t, answer=ans_t, readout=readout, relword=relword)
        scene = self.scenes.get(image)
        if scene is None:
            raise ValueError(f"image {image} is not in the world's scenes.json: privileged supervision needs the "
                             "scene of every training image (point `scenes` at the world that wrote this data)")
        if scene.get("split") != "train":
            raise ValueError(f"image {image} is a {scene.get('split')} image: privileged supervision is for training "
                             "images only")
        objects = scene["objects"]
        words = self.tokenizer.convert_ids_to_tokens(list(input_ids))
        # noun-phrase heads: at each NP word, the objects matching the phrase read so far
        run = []
        for p, w in enumerate(words):
            run = run + [w] if _is_np_word(w) else []
            if run:
                np_t[p] = self.distribution(image, _np_match(run, objects))
        rows, cols = (position_words(self.grid) or ((), ())) if self.place_words else ((), ())
        for p in range(4, T - 1):  # "what is in the <row> <col>": the row's objects, then the cell's
            if words[p - 4:p] == CELL_QUESTION and words[p] in rows and words[p + 1] in cols:
                in_row = [i for i, o in enumerate(objects) if o["row"] == rows.index(words[p])]
                np_t[p] = self.distribution(image, in_row)
                col = cols.index(words[p + 1])
                np_t[p + 1] = self.distribution(image, [i for i in in_row if objects[i]["col"] == col])
        # answer heads and readout: the positions predicting each answer run (turn k's answer)
        turns = record["conversations"]
        runs, p = [], 1
        while p < T:
            if labels[p] != IGNORE_INDEX:
                q = p
                while q < T and labels[q] != IGNORE_INDEX:
                    q += 1
                runs.append((p, q))  # answer tokens p..q-1, predicted at p-1..q-2
                p = q
            p += 1
        for k, (a0, a1) in enumerate(runs):
            if 2 * k + 1 >= len(turns):
                break
            question, answer = turns[2 * k]["value"], turns[2 * k + 1]["value"]
            if question.replace("<image>", " ").split() == PROMPT.split():  # a caption
                if not self.captions:
                    continue
                per_word = caption_objects(answer, objects)
            else:
                about = question_objects(question, answer, objects, self.grid)
                if about is None:
                    continue
                per_word = [about] * (a1 - a0)
                # the relation word the question asks about: the last one between the previous answer and this one
                start = runs[k - 1][1] if k else 0
                rel = [p for p in range(start, a0) if words[p] in _RELATIONS]
                if rel and question.replace("<image>", " ").split()[:4] != CELL_QUESTION:
                    relword[a0 - 1:a1 - 1] = rel[-1]
            for j, pos in enumerate(range(a0 - 1, a1 - 1)):
                pair = per_word[min(j, len(per_word) - 1)]
                if pair is None:
                    continue
                for h in (0, 1):
                    ans_t[pos, h] = self.distribution(image, pair[h])
                readout[pos] = torch.tensor(self.readout(objects, *pair))
        return dict(np=np_t, answer=ans_t, readout=readout, relword=relword)


# -----------------------------------------------------------------------------
# the losses


def head_probs(query, key, attention_mask, heads, scaling=None):
    """softmax(q k^T) of the query heads `heads` over every key, float32: (B, len(heads), T, S). GQA: each query head
    reads its kv head. Rows that see nothing (padding) are zeros."""
    B, H, T, D = query.shape
    kv = [h // (H // key.shape[1]) for h in heads]
    scaling = scaling if scaling is not None else D ** -0.5
    with torch.autocast(query.device.type, enabled=False):
        s = query[:, list(heads)].float() @ key[:, kv].float().transpose(-1, -2) * scaling
        S = s.shape[-1]
        if attention_mask is None:  # SDPA ran with is_causal=True
            s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=s.device).triu(S - T + 1), float("-inf"))
        elif attention_mask.dtype == torch.bool:
            s = s.masked_fill(~attention_mask[:, :1], float("-inf"))
        else:
            s = s + attention_mask[:, :1].float()
        return s.softmax(-1).nan_to_num(0.0)


def look_loss(probs, cols, target):
    """Mean KL(target || attention) over the rows that have a target. probs (B, h, T, S); cols (B, N_v) the image
    tokens' positions; target (B, T, N_v + 1) over the image tokens and "elsewhere" (the rest of the mass). Zero
    exactly when the heads' attention over the N_v + 1 bins equals the target."""
    idx = cols[:, None, None, :].expand(*probs.shape[:3], cols.shape[1])
    img = probs.gather(-1, idx)  # (B, h, T, N_v)
    bins = torch.cat([img, (1 - img.sum(-1, keepdim=True))], -1).clamp(min=1e-8)
    t = target[:, None].float()  # (B, 1, T, N_v + 1)
    kl = (t * (t.clamp(min=1e-8).log() - bins.log())).sum(-1)  # (B, h, T)
    has = (target.sum(-1) > 0)[:, None].expand_as(kl)
    return kl[has].mean() if has.any() else probs.sum() * 0.0


class _Recorder:
    """Keeps what the attention layers saw (attention_distill's capture hook) so the heads' maps can be computed
    after the forward; and the readout layer's output."""

    def __init__(self):
        self.seen, self.hidden = {}, None

    def record(self, module, query, key, attention_mask, scaling):
        self.seen[module.layer_idx] = (query, key, attention_mask, scaling)


class Privileged(nn.Module):
    """The two privileged losses of one step (look, readout), from the student's own forward: used while a teacher
    trains (the "student" of that run is the future teacher). The readout head is a submodule here, not of the VLM,
    so no checkpoint ever holds it."""

    def __init__(self, settings, d_model, grid, look_weight=1.0, readout_weight=1.0):
        super().__init__()
        self.settings, self.look_weight, self.readout_weight, self.grid = settings, look_weight, readout_weight, grid
        self.readout = nn.Linear(d_model, 4 * grid + 2 * SIDES) if readout_weight > 0 else None

    @property
    def layers(self):
        s = self.settings
        return sorted(set(s.np_layers) | set(s.answer_layers)) if self.look_weight > 0 else []

    @contextmanager
    def capture(self, llm):
        """Within it, a forward of `llm` records the inputs of the supervised attention layers and the readout
        layer's output."""
        mods, rec = ad.attention_modules(llm), _Recorder()
        missing = [l for l in self.layers + [self.settings.readout_layer] if l not in mods]
        if missing:
            raise ValueError(f"privileged: layers {missing} do not exist in a {len(mods)}-layer LM; set "
                             "privileged=dict(np_layers=..., answer_layers=..., readout_layer=...)")
        for l in self.layers:
            if getattr(mods[l], "_vat_capture", None) is not None:
                raise ValueError("privileged supervision and VAT cannot capture the same layers")
            mods[l]._vat_capture = rec
        hook = None
        if self.readout is not None:
            layer = llm.base_model.layers[self.settings.readout_layer]
            hook = layer.register_forward_hook(
                lambda m, i, out: setattr(rec, "hidden", out[0] if isinstance(out, tuple) else out))
        try:
            yield rec
        finally:
            for l in self.layers:
                del mods[l]._vat_capture
            if hook is not None:
                hook.remove()

    def losses(self, rec, batch, is_img, n_image_tokens):
        """(look, readout) from a finished capture `rec` and the batch's targets (batch["privileged"])."""
        t, s = batch["privileged"], self.settings
        zero = next(iter(rec.seen.values()))[0].sum() * 0.0 if rec.seen else rec.hidden.sum() * 0.0
        look = readout = zero
        if self.look_weight > 0:
            cols = ad.image_columns(is_img, n_image_tokens)
            terms = []
            for l in s.np_layers:
                q, k, m, sc = rec.seen[l]
                terms.append(look_loss(head_probs(q, k, m, s.np_heads, sc), cols, t["np"]))
            has = t["relword"] != IGNORE_INDEX
            relation = s.relation_head >= 0 and bool(has.any())
            heads = tuple(s.answer_heads) + ((s.relation_head,) if relation else ())
            for l in s.answer_layers:
                q, k, m, sc = rec.seen[l]
                p = head_probs(q, k, m, heads, sc)  # (B, 2 or 3, T, S): subject, reference [, relation word]
                terms += [look_loss(p[:, h:h + 1], cols, t["answer"][:, :, h]) for h in (0, 1)]
                if relation:  # -log(attention on the relation word)
                    on = p[:, 2].gather(-1, t["relword"].clamp(min=0)[..., None])[..., 0]
                    terms.append(-on[has].clamp(min=1e-8).log().mean())
            look = torch.stack(terms).mean()
        if self.readout is not None:
            logits = self.readout(rec.hidden.float())  # (B, T, 4 grid + 6)
            g = self.grid
            parts = list(logits.split([g, g, g, g, SIDES, SIDES], -1))
            tgt = t["readout"]
            ce = [F.cross_entropy(x.flatten(0, 1), tgt[..., j].flatten(), ignore_index=IGNORE_INDEX,
                                  reduction="sum") for j, x in enumerate(parts)]
            n = (tgt != IGNORE_INDEX).sum()
            readout = torch.stack(ce).sum() / n.clamp(min=1)
        return look, readout
