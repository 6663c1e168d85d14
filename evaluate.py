"""
Evaluation: VQA, compositional reasoning (SugarCrepe-style CR, Winoground/BiVLC-style), POPE, the
teacher-student attention alignment (the paper's diagnosis) and attention heat-map pictures.

    python evaluate.py --model=out/shapes/sft --teacher=out/shapes/teacher --data=out/shapes --heatmaps=4

writes report.json and report.md to --out (default <model>/eval) and prints the table. From Python:

    report = evaluate(model, "out/shapes", tasks="vqa,cr,pope,align", teacher=teacher)
    print(compare_table({"sft": report_a, "compodistill": report_b}))

Inputs (shapes writes the first three under <data>/test/; real benchmarks in the same formats work with
--image_folder pointing at their images):
  vqa.jsonl          {"question" | "text", "answer" (str) | "answers" (list of str or {"answer"}), "image"}
  cr/{subset}.json   SugarCrepe: {id: {"filename", "caption", "negative_caption"}}
  pope_*.json[l]     {"question" | "text", "answer" | "label" ("yes"/"no"), "image", "category"}
  winoground.jsonl   {"image_0", "image_1", "caption_0", "caption_1"} (Winoground) or
                     {"image", "negative_image", "caption", "negative_caption"} (BiVLC)

Protocols (METHOD.md, "Evaluation protocols"); every prompt goes through data.tokenize_conversation with
a last human turn, so it ends with " ASSISTANT:" exactly as in training.
  vqa    greedy short answer; normalised exact match (VQA soft accuracy min(1, #matches / 3) for a list).
  cr     mcq: MCQ_PROMPT asked in both orders (positive as (A), then as (B)), greedy, accuracy per order
         and averaged, per subset and the unweighted mean. likelihood: length-normalised
         log P(caption + <eos> | image, caption_prompt) of the positive vs the negative caption.
  wino   text / image / group scores from the 2x2 likelihood table.
  pope   generate: the first word must be yes/no (anything else is invalid and counted wrong);
         forced: "yes" vs "no" log-probability at the first answer position. Accuracy, precision,
         recall, F1 (positive class "yes"), yes-ratio and invalid rate per split.
  align  needs a teacher: head-averaged attention on the image-token keys in the matched layers
         (model.TeacherStudent's layers and group windows, as in training; default: the student's
         training config). image queries (rows = image tokens, the VAT default): 1 - the VAT column-form
         distance (attention_distill.vat_loss, cosine, layer_reduce="mean", i.e. exactly 1 - the training
         loss) and the plain flattened cosine. text queries (rows = the question / caption tokens): the
         flattened cosine and the cosine of the row-averaged profiles. With the LLaVA layout (image before
         the text) and causal attention, image-token queries never see the text, so image-query numbers
         depend on the image alone; the text-query numbers are the ones that differ between VQA and CR.
  heatmaps  the image, then per matched pair the teacher's and the student's attention over the patch
         grid (image queries: VAT's filtered column mean; text queries: row mean), blended over the image.
--limit=N takes the first N items of the VQA file, of each CR subset, of each POPE split, of the
Winoground file. For real models set --answer_suffix (e.g. LLaVA's "\nAnswer the question using a single
word or phrase.") and --caption_prompt to what they were trained with.

report.json: {model, teacher, data, tasks, limit, device, notes, skipped, seconds, matched_layers,
  vqa: {n, accuracy, per_type, examples},
  cr: {subsets, mcq: {avg, invalid, per_subset: {s: {n, acc_pos_first, acc_pos_second, acc, both, invalid}},
                      unknown_words, examples}, likelihood: {avg, per_subset: {s: {n, acc}}}},
  pope: {generate | forced: {avg, per_split: {split: {n, accuracy, precision, recall, f1, yes_ratio, invalid}}}},
  wino: {n, text, image, group},
  align: {vqa | cr: {n, image_queries: {vat_cos, flat_cos, per_pair}, text_queries: {flat_cos, column_cos}}},
  heatmaps: [png paths]}; every score is a fraction in [0, 1] (tables print %).

Shapes note: the shapes tokenizer is word level; its vocabulary includes MCQ_PROMPT's words (any prompt
word it lacks becomes <unk>, listed in report["cr"]["mcq"]["unknown_words"]), but the small shapes
models are never trained on multiple choice: expect the MCQ protocol near chance or invalid for them;
the likelihood protocol is the informative one there.
"""

import json
import math
import os
import re
import sys
import time
import warnings
from collections import OrderedDict, defaultdict
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import attention_distill as ad
from data import IGNORE_INDEX, collate, load_records, tokenize_conversation
from model import VLM, TeacherStudent, checkpoint_kind, has_weights

TASKS = ["vqa", "cr", "pope", "wino", "align"]
CR_ORDER = ["swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel", "add_obj", "add_att"]
CAPTION_PROMPT = "describe the image ."  # = shapes.PROMPT, the LLaVA-pretrain style prompt of the captions
MCQ_PROMPT = "Which caption describes the image?\n(A) {a}\n(B) {b}\nAnswer with A or B."
MAX_NEW_TOKENS = dict(vqa=16, pope=6, mcq=40)  # mcq: long enough for a model that repeats a caption
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}


# -----------------------------------------------------------------------------
# metrics: pure functions on answers and scores


def normalize_answer(text):
    """VQA normalisation: lower case, no punctuation, no articles, number words as digits."""
    s = str(text).lower().replace("'", "")
    s = re.sub(r"(?<=\d),(?=\d)", "", s)                       # 1,000 -> 1000
    s = re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s]", " ", s)          # punctuation -> space, keep 1.5
    words = [NUMBER_WORDS.get(w, w) for w in s.split() if w not in ARTICLES]
    return " ".join(words)


def vqa_score(prediction, answers):
    """Exact match against one answer (0/1), or VQA soft accuracy min(1, #matches / 3) against a list."""
    p = normalize_answer(prediction)
    if isinstance(answers, str):
        return float(p == normalize_answer(answers))
    return min(1.0, sum(p == normalize_answer(a) for a in answers) / 3.0)


def _words(text):
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def parse_choice(answer, captions):
    """
    The option (0 = A, 1 = B) a free-form MCQ answer picks, or -1 (invalid). "(B)", "B.", "b", "B" are
    B; a bare leading "a" followed by more words is the article ("a red circle"), not option A; an answer
    that repeats one caption's text picks that option.
    """
    s = answer.strip().lower()
    s = re.sub(r"^(the\s+)?(correct\s+)?(answer|option|choice)(\s+is)?\s*[:\-]?\s*", "", s)
    m = re.match(r"^(\()?([ab])(?!\w)(.*)$", s, re.S)
    if m:
        paren, letter, rest = m.group(1), m.group(2), m.group(3)
        marked = paren is not None or re.match(r"^\s*[).:,]", rest) is not None
        if marked or letter == "b" or not re.search(r"\w", rest):
            return "ab".index(letter)
    padded = f" {_words(answer)} "
    hits = [i for i, c in enumerate(captions) if _words(c) and f" {_words(c)} " in padded]
    if len(hits) == 2:  # one caption inside the other (e.g. an added object): the longer one was said
        la, lb = (len(_words(c)) for c in captions)
        hits = [] if la == lb else [0 if la > lb else 1]
    return hits[0] if len(hits) == 1 else -1


def mcq_accuracy(choices_pos_first, choices_pos_second):
    """Both-order MCQ: the positive is (A) in the first list and (B) in the second (items aligned)."""
    first = [c == 0 for c in choices_pos_first]
    second = [c == 1 for c in choices_pos_second]
    n = len(first)
    if n == 0 or len(second) != n:
        raise ValueError(f"both orders need the same, non-zero number of items ({n} vs {len(second)})")
    invalid = sum(c == -1 for c in choices_pos_first) + sum(c == -1 for c in choices_pos_second)
    a1, a2 = sum(first) / n, sum(second) / n
    return dict(n=n, acc_pos_first=a1, acc_pos_second=a2, acc=(a1 + a2) / 2,
                both=sum(x and y for x, y in zip(first, second)) / n, invalid=invalid / (2 * n))


def parse_yes_no(answer):
    """'yes' / 'no' from the first word of an answer, else None (invalid)."""
    first = re.findall(r"[a-z]+", answer.lower())[:1]
    return first[0] if first and first[0] in ("yes", "no") else None


def pope_metrics(predictions, labels):
    """
    POPE with "yes" as the positive class. predictions: "yes" / "no" / None (invalid); an invalid answer
    is wrong: a false negative on a "yes" item, neither FP nor TN on a "no" item.
    """
    n = len(labels)
    if n == 0 or len(predictions) != n:
        raise ValueError(f"POPE needs as many predictions as labels ({len(predictions)} vs {n}), and some")
    tp = sum(p == "yes" and l == "yes" for p, l in zip(predictions, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(predictions, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(predictions, labels))
    n_pos = sum(l == "yes" for l in labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_pos if n_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(n=n, accuracy=(tp + tn) / n, precision=precision, recall=recall, f1=f1,
                yes_ratio=sum(p == "yes" for p in predictions) / n,
                invalid=sum(p is None for p in predictions) / n)


def winoground_scores(S):
    """
    S[i][j] = score(caption_i, image_j), caption_i belongs to image_i. text: for each image its own
    caption scores higher; image: for each caption its own image scores higher; group: both. Ties fail.
    """
    (s00, s01), (s10, s11) = [[float(x) for x in row] for row in S]
    text = s00 > s10 and s11 > s01
    image = s00 > s01 and s11 > s10
    return dict(text=float(text), image=float(image), group=float(text and image))


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# -----------------------------------------------------------------------------
# data: the test files, with image paths checked up front


def _read_rows(path):
    """A JSON list/dict file or JSON lines (real POPE files are JSON lines named *.json)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return load_records(path) if path.endswith(".jsonl") else [json.loads(l) for l in text.splitlines() if l.strip()]


def _read_list(path):
    rows = _read_rows(path)
    return [rows] if isinstance(rows, dict) else rows  # a one-line JSON-lines file parses as one object


def _first_existing(*paths):
    return next((p for p in paths if p and os.path.exists(p)), None)


def _keep_with_images(items, keys, folder, task):
    """Drop (and count) items whose image files are missing: a few bad rows must not stop a long run."""
    kept, missing = [], []
    for it in items:
        absent = [os.path.join(folder, it[k]) for k in keys if not os.path.isfile(os.path.join(folder, it[k]))]
        if absent:
            missing.append(absent[0])
        else:
            kept.append(it)
    if missing and not kept:
        raise FileNotFoundError(f"{task}: none of the {len(missing)} items' images exist (e.g. {missing[0]}); "
                                "set --image_folder to the folder the test file's image paths are relative to")
    if missing:
        warnings.warn(f"{task}: skipping {len(missing)} items whose images are missing (e.g. {missing[0]})")
    return kept, len(missing)


def load_vqa(path, folder, limit=None):
    items = []
    for r in _read_list(path)[:limit or None]:
        answers = r.get("answers", r.get("answer"))
        if answers is None:
            raise ValueError(f"{path}: item {r.get('question_id', r.get('id'))!r} has no 'answer' / 'answers' "
                             "(a test-dev file without answers is scored by the benchmark's own server)")
        if isinstance(answers, list):
            answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
        items.append(dict(question=r.get("question", r.get("text")), answers=answers, image=r["image"],
                          type=r.get("type", r.get("question_type", r.get("category")))))
    return _keep_with_images(items, ["image"], folder, f"vqa ({path})")


def cr_subsets(cr_dir):
    names = [f[:-5] for f in os.listdir(cr_dir) if f.endswith(".json")]
    return [s for s in CR_ORDER if s in names] + sorted(s for s in names if s not in CR_ORDER)


def load_cr(cr_dir, folder, limit=None):
    items, skipped = [], 0
    for subset in cr_subsets(cr_dir):
        rows = _read_rows(os.path.join(cr_dir, subset + ".json"))
        rows = list(rows.values()) if isinstance(rows, dict) else rows
        sub = [dict(subset=subset, image=r["filename"], pos=r["caption"], neg=r["negative_caption"])
               for r in rows[:limit or None]]
        sub, k = _keep_with_images(sub, ["image"], folder, f"cr/{subset}")
        items += sub
        skipped += k
    return items, skipped


def load_pope(files, folder, limit=None):
    items, skipped = [], 0
    for path in files:
        default_split = re.sub(r"^.*pope_", "", os.path.basename(path)).split(".")[0]
        by_split = defaultdict(list)
        for r in _read_list(path):
            by_split[r.get("category", default_split)].append(
                dict(question=r.get("question", r.get("text")), label=str(r.get("answer", r.get("label"))).strip().lower(),
                     image=r["image"]))
        for split, rows in by_split.items():
            sub, k = _keep_with_images(rows[:limit or None], ["image"], folder, f"pope/{split}")
            items += [dict(it, split=split) for it in sub]
            skipped += k
    return items, skipped


def load_wino(path, folder, limit=None):
    items = []
    for r in _read_list(path)[:limit or None]:
        if "image_0" in r:
            items.append(dict(images=[r["image_0"], r["image_1"]], captions=[r["caption_0"], r["caption_1"]]))
        else:
            items.append(dict(images=[r["image"], r["negative_image"]], captions=[r["caption"], r["negative_caption"]]))
    for it in items:
        it["image_0"], it["image_1"] = it["images"]
    return _keep_with_images(items, ["image_0", "image_1"], folder, f"wino ({path})")


def find_files(data_dir, vqa_file="", cr_dir="", pope_dir="", wino_file=""):
    """The test files under data_dir (shapes layout <data>/test/..., or directly in <data>), or the overrides."""
    t = os.path.join(data_dir, "test")
    pope_dir = pope_dir or _first_existing(t, data_dir) or data_dir
    pope = sorted(os.path.join(pope_dir, f) for f in os.listdir(pope_dir)
                  if "pope_" in f and f.endswith((".json", ".jsonl"))) if os.path.isdir(pope_dir) else []
    return dict(vqa=vqa_file or _first_existing(os.path.join(t, "vqa.jsonl"), os.path.join(data_dir, "vqa.jsonl")),
                cr=cr_dir or _first_existing(os.path.join(t, "cr"), os.path.join(data_dir, "cr")),
                pope=pope,
                wino=wino_file or _first_existing(os.path.join(t, "winoground.jsonl"),
                                                  os.path.join(data_dir, "winoground.jsonl")))


# -----------------------------------------------------------------------------
# running the model: prompts -> batches -> answers / log-probabilities / attention


class Runner:
    """The model, its tokenizer and image processor, a small image cache, and the batch loop."""

    def __init__(self, model, image_folder, batch_size=16, progress=True, cache_size=256):
        if model.tokenizer is None or model.image_processor is None:
            raise ValueError("the model has no tokenizer / image_processor attached; load it with "
                             "VLM.from_pretrained(<checkpoint dir>) or set model.tokenizer / model.image_processor")
        self.model, self.tok, self.proc = model, model.tokenizer, model.image_processor
        self.folder, self.batch_size, self.progress = image_folder, batch_size, progress
        self.device = next(model.parameters()).device
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self._cache, self._cache_size = OrderedDict(), cache_size

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def pixels(self, rel):
        if rel not in self._cache:
            with Image.open(os.path.join(self.folder, rel)) as im:
                img = im.convert("RGB")
            self._cache[rel] = self.proc(images=img, return_tensors="pt").pixel_values[0]
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(rel)
        return self._cache[rel]

    def sample(self, prompt, image, answer=None):
        """One tokenized sample: a human turn (image first, LLaVA style) [+ the answer, supervised]."""
        conv = [{"from": "human", "value": prompt}] + ([{"from": "gpt", "value": answer}] if answer is not None else [])
        ids, labels = tokenize_conversation(conv, self.tok, self.model.num_image_tokens, True)
        return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), pixel_values=self.pixels(image))

    def batches(self, specs, desc):
        """Yield (collated batch on device, slice of specs); spec = (prompt, image, answer or None)."""
        bar = tqdm(range(0, len(specs), self.batch_size), desc=desc, disable=not self.progress, leave=False)
        for i in bar:
            chunk = specs[i:i + self.batch_size]
            b = collate([self.sample(*s) for s in chunk], self.pad_id)
            yield {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()}, chunk

    @torch.no_grad()
    def generate(self, specs, max_new_tokens, desc):
        out = []
        for b, _ in self.batches(specs, desc):
            with self.autocast():
                new = self.model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], max_new_tokens)
            for row in new.tolist():
                if self.tok.eos_token_id in row:
                    row = row[:row.index(self.tok.eos_token_id)]
                out.append(self.tok.decode(row, skip_special_tokens=True).strip())
        return out

    def _hidden(self, b):
        m = self.model
        return m.hidden_states(b["input_ids"], b["attention_mask"], m.project(m.vision_features(b["pixel_values"])))

    @torch.no_grad()
    def loglik(self, specs, desc):
        """Mean log-probability of each spec's answer tokens (its <eos> included) given image and prompt."""
        out = []
        for b, _ in self.batches(specs, desc):
            with self.autocast():
                h = self._hidden(b)
                pred = b["labels"][:, 1:] != IGNORE_INDEX
                logits = self.model.logits(h[:, :-1][pred])
            lp = logits.float().log_softmax(-1).gather(-1, b["labels"][:, 1:][pred][:, None])[:, 0]
            rows = pred.nonzero()[:, 0]
            sums = torch.zeros(len(pred), device=lp.device).index_add_(0, rows, lp)
            out += (sums / pred.sum(1).clamp(min=1)).tolist()
        return out

    def first_token_ids(self, word):
        """Ids that start the answer `word` after the prompt (lower- and capitalised spellings)."""
        ids = set()
        for w in (word, word.capitalize()):
            enc = self.tok(" " + w, add_special_tokens=False).input_ids  # data.CHAT.answer_prefix is " "
            if enc and enc[0] != self.tok.unk_token_id:
                ids.add(enc[0])
        return sorted(ids)

    @torch.no_grad()
    def first_token_logprobs(self, specs, words, desc):
        """For each spec (a prompt), log P(answer starts with word) for each word: (N, len(words))."""
        groups = [self.first_token_ids(w) for w in words]
        if not all(groups):
            raise ValueError(f"the tokenizer cannot spell {words}")
        out = []
        for b, _ in self.batches(specs, desc):
            with self.autocast():
                h = self._hidden(b)
                last = b["attention_mask"].sum(1) - 1
                logits = self.model.logits(h[torch.arange(len(last)), last])
            lp = logits.float().log_softmax(-1)
            out.append(torch.stack([lp[:, g].logsumexp(-1) for g in groups], 1).cpu())
        return torch.cat(out).tolist()


def unknown_words(tok, text):
    """Words of `text` the tokenizer maps to <unk> (word-level tokenizers only ever do this)."""
    if tok.unk_token_id is None:
        return []
    unk = []
    for w in text.split():
        ids = tok(w, add_special_tokens=False).input_ids
        pieces = tok.convert_ids_to_tokens(ids)
        for i, p in zip(ids, pieces):
            if i == tok.unk_token_id:
                unk.append(w)
                break
    return sorted(set(unk))


# -----------------------------------------------------------------------------
# tasks


def run_vqa(r, items, answer_suffix="", max_new_tokens=MAX_NEW_TOKENS["vqa"]):
    preds = r.generate([(it["question"] + answer_suffix, it["image"], None) for it in items], max_new_tokens, "vqa")
    scores = [vqa_score(p, it["answers"]) for p, it in zip(preds, items)]
    per_type = defaultdict(list)
    for s, it in zip(scores, items):
        if it.get("type"):
            per_type[it["type"]].append(s)
    return dict(n=len(items), accuracy=_mean(scores), per_type={k: _mean(v) for k, v in sorted(per_type.items())},
                examples=[dict(question=it["question"], answer=it["answers"], prediction=p, score=s)
                          for it, p, s in list(zip(items, preds, scores))[:8]])


def run_cr(r, items, protocols, mcq_prompt=MCQ_PROMPT, caption_prompt=CAPTION_PROMPT):
    subsets = list(dict.fromkeys(it["subset"] for it in items))
    report = dict(subsets=subsets)
    if "mcq" in protocols:
        # all items with the positive as (A), then all with the positive as (B)
        specs = [(mcq_prompt.format(a=it["pos"], b=it["neg"]), it["image"], None) for it in items]
        specs += [(mcq_prompt.format(a=it["neg"], b=it["pos"]), it["image"], None) for it in items]
        answers = r.generate(specs, MAX_NEW_TOKENS["mcq"], "cr mcq")
        n = len(items)
        choices = [parse_choice(a, (it["pos"], it["neg"])) for a, it in zip(answers[:n], items)]
        choices += [parse_choice(a, (it["neg"], it["pos"])) for a, it in zip(answers[n:], items)]
        per = {s: mcq_accuracy([c for c, it in zip(choices[:n], items) if it["subset"] == s],
                               [c for c, it in zip(choices[n:], items) if it["subset"] == s]) for s in subsets}
        report["mcq"] = dict(avg=_mean(v["acc"] for v in per.values()), per_subset=per,
                             invalid=_mean(v["invalid"] for v in per.values()),
                             unknown_words=unknown_words(r.tok, mcq_prompt.format(a="", b="")),
                             examples=[dict(subset=it["subset"], pos=it["pos"], neg=it["neg"], answer_pos_first=a1,
                                            answer_pos_second=a2) for it, a1, a2 in
                                       list(zip(items, answers[:n], answers[n:]))[:8]])
    if "likelihood" in protocols:
        specs = [(caption_prompt, it["image"], c) for it in items for c in (it["pos"], it["neg"])]
        lp = r.loglik(specs, "cr likelihood")
        right = [lp[2 * i] > lp[2 * i + 1] for i in range(len(items))]
        per = {s: dict(n=sum(it["subset"] == s for it in items),
                       acc=_mean(ok for ok, it in zip(right, items) if it["subset"] == s)) for s in subsets}
        report["likelihood"] = dict(avg=_mean(v["acc"] for v in per.values()), per_subset=per)
    return report


def run_pope(r, items, answer_suffix=""):
    specs = [(it["question"] + answer_suffix, it["image"], None) for it in items]
    answers = r.generate(specs, MAX_NEW_TOKENS["pope"], "pope generate")
    gen = [parse_yes_no(a) for a in answers]
    lp = r.first_token_logprobs(specs, ["yes", "no"], "pope forced")
    forced = ["yes" if y > n else "no" for y, n in lp]
    splits = list(dict.fromkeys(it["split"] for it in items))
    report = {}
    for name, preds in (("generate", gen), ("forced", forced)):
        per = {s: pope_metrics([p for p, it in zip(preds, items) if it["split"] == s],
                               [it["label"] for it in items if it["split"] == s]) for s in splits}
        keys = ["accuracy", "precision", "recall", "f1", "yes_ratio", "invalid"]
        report[name] = dict(per_split=per, avg={k: _mean(v[k] for v in per.values()) for k in keys})
    report["examples"] = [dict(question=it["question"], label=it["label"], answer=a)
                          for it, a in list(zip(items, answers))[:8]]
    return report


def run_wino(r, items, caption_prompt=CAPTION_PROMPT):
    specs = [(caption_prompt, it["images"][j], it["captions"][i]) for it in items for i in (0, 1) for j in (0, 1)]
    lp = r.loglik(specs, "wino")
    per = [winoground_scores([[lp[4 * k], lp[4 * k + 1]], [lp[4 * k + 2], lp[4 * k + 3]]]) for k in range(len(items))]
    return dict(n=len(items), **{k: _mean(p[k] for p in per) for k in ("text", "image", "group")})


# -----------------------------------------------------------------------------
# attention: the matched layers of student (and teacher), image-key columns, all query rows


def matched_layers(student, teacher, student_layers=None, teacher_layers=None, matching=None):
    """
    (student layers, teacher windows) as in training: explicit arguments, else the layers the student was
    distilled on (config.extra["distill"], carried by trainer.py through later stages), else its training
    config, else the presets. Without a teacher the windows are None. Adaptive matching is reported on its
    group windows (it picks per step in training).
    """
    extra = student.config.extra or {}
    tc = extra.get("distill") or extra.get("train_config", {})
    student_layers = student_layers if student_layers is not None else tc.get("student_layers")
    teacher_layers = teacher_layers if teacher_layers is not None else tc.get("teacher_layers")
    matching = matching or tc.get("matching") or "group"
    if teacher is None:
        return ad.resolve_layers(student_layers, student.llm.config.num_hidden_layers), None
    ts = TeacherStudent(teacher, student, student_layers, teacher_layers, matching=matching)
    return ts.student_layers, ts.windows


@torch.no_grad()
def attention_maps(model, b, layers):
    """{layer: (B, T, N_v)} head-averaged attention of every query position on the image keys, and cols."""
    ids, mask = b["input_ids"], b["attention_mask"]
    is_img, has_img = model.image_positions(ids)
    if not bool(has_img.all()):
        raise ValueError("attention maps need an image in every sample")
    B, T = ids.shape
    cols = model.image_columns(is_img)
    rows = torch.arange(T, device=ids.device).expand(B, T)
    with ad.capture_attention(model.llm, layers, rows, cols) as maps:
        model.hidden_states(ids, mask, model.project(model.vision_features(b["pixel_values"])))
    return dict(maps), cols


def _matched_stack(r, b, student, teacher, s_layers, windows):
    """A_s, A_t: (L, B, T, N_v) (A_t None without a teacher; teacher windows averaged), cols, text rows."""
    with r.autocast():
        maps_s, cols = attention_maps(student, b, s_layers)
        A_s = torch.stack([maps_s[l] for l in s_layers])
        A_t = None
        if teacher is not None:
            maps_t, _ = attention_maps(teacher, b, sorted({l for w in windows for l in w}))
            A_t = torch.stack([torch.stack([maps_t[l] for l in w]).mean(0) for w in windows])
    T = b["input_ids"].shape[1]
    text_rows = b["attention_mask"].bool() & (torch.arange(T, device=cols.device)[None] > cols[:, -1:])
    return A_s.float(), None if A_t is None else A_t.float(), cols, text_rows


def _image_rows(A, cols):
    L, B, _, Nv = A.shape
    return A.gather(2, cols[None, :, :, None].expand(L, B, Nv, Nv))


def run_align(r, teacher, s_layers, windows, specs, desc):
    """Mean student-teacher attention similarity over `specs` (prompt, image, answer or None)."""
    L = len(s_layers)
    sums = defaultdict(float)
    pair = defaultdict(lambda: [0.0] * L)
    n = 0
    for b, chunk in r.batches(specs, desc):
        A_s, A_t, cols, text_rows = _matched_stack(r, b, r.model, teacher, s_layers, windows)
        B = A_s.shape[1]
        I_s, I_t = _image_rows(A_s, cols), _image_rows(A_t, cols)
        flat = F.cosine_similarity(I_s.flatten(2), I_t.flatten(2), dim=-1, eps=1e-8)  # (L, B)
        for l in range(L):  # vat_loss averages over samples: times B gives the batch's sum
            vat = 1.0 - float(ad.vat_loss(I_s[l:l + 1], I_t[l:l + 1], pool="column", loss="cosine",
                                          filter_outliers=True, layer_reduce="mean"))
            pair["vat_cos"][l] += vat * B
            pair["flat_cos"][l] += float(flat[l].sum())
        tm = text_rows[None, :, :, None].float()
        T_s, T_t = A_s * tm, A_t * tm
        sums["text_flat_cos"] += float(F.cosine_similarity(T_s.flatten(2), T_t.flatten(2), dim=-1, eps=1e-8).mean(0).sum())
        sums["text_column_cos"] += float(F.cosine_similarity(T_s.sum(2), T_t.sum(2), dim=-1, eps=1e-8).mean(0).sum())
        n += B
    names = [f"s{s}<-t{w[0]}" + (f"..{w[-1]}" if len(w) > 1 else "") for s, w in zip(s_layers, windows)]
    per_pair = {nm: dict(vat_cos=pair["vat_cos"][l] / n, flat_cos=pair["flat_cos"][l] / n) for l, nm in enumerate(names)}
    return dict(n=n,
                image_queries=dict(vat_cos=_mean(v["vat_cos"] for v in per_pair.values()),
                                   flat_cos=_mean(v["flat_cos"] for v in per_pair.values()), per_pair=per_pair),
                text_queries=dict(flat_cos=sums["text_flat_cos"] / n, column_cos=sums["text_column_cos"] / n))


# -----------------------------------------------------------------------------
# heat maps (Pillow only)

# Anchors of matplotlib's "inferno" colour map, interpolated linearly.
_INFERNO = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                     (250, 193, 39), (252, 255, 164)], dtype=np.float32)
HEAT = dict(panel=128, title_h=34, header_h=16, label_w=112, alpha=0.6)


def colormap(x):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 inferno colours."""
    pos = np.clip(x, 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_INFERNO) - 2)
    t = (pos - lo)[..., None]
    return ((1 - t) * _INFERNO[lo] + t * _INFERNO[lo + 1]).round().astype(np.uint8)


def heatmap_size(n_pairs, n_rows, panel=HEAT["panel"]):
    """(width, height) of a heat-map picture: label column + image + one panel per matched pair."""
    return HEAT["label_w"] + (1 + n_pairs) * panel, HEAT["title_h"] + HEAT["header_h"] + n_rows * panel


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
    One PNG: a title row, then one row per (label, [grid per matched pair]): the image, then each grid
    (min-max normalised per panel, raw range printed on it) upsampled onto the image with the colour map
    blended over it.
    """
    W, H = heatmap_size(len(col_titles), len(rows), panel)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    font = load_font(12)
    for i, line in enumerate(_wrap(d, title, font, W - 8)):
        d.text((4, 2 + 15 * i), line, fill=(0, 0, 0), font=font)
    y0 = HEAT["title_h"]
    x0 = HEAT["label_w"]
    for j, ct in enumerate(["image"] + list(col_titles)):
        d.text((x0 + j * panel + 3, y0 + 1), ct, fill=(0, 0, 0), font=font)
    y0 += HEAT["header_h"]
    base = image.convert("RGB").resize((panel, panel), Image.NEAREST if image.width < panel else Image.BICUBIC)
    base_np = np.asarray(base, dtype=np.float32)
    for i, (label, grids) in enumerate(rows):
        y = y0 + i * panel
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
            # each panel is min-max normalised: print the raw range so magnitudes stay comparable
            d.text((x + 2, y + panel - 14), f"{grid.min():.3g}-{grid.max():.3g}", fill=(255, 255, 255),
                   font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    canvas.save(path)
    return path


def _profiles(A, cols, text_rows, b):
    """Per matched layer, the heat-map profiles over image keys for sample b: image-query rows (column
    mean over the model's own non-outlier entries, as VAT's column form) and text-query rows (mean)."""
    I = _image_rows(A[:, b:b + 1], cols[b:b + 1])[:, 0]  # (L, Nv, Nv)
    keep = ad._outlier_keep(I[:, None])[:, 0] & (I != 0)
    img = (I * keep).sum(1) / keep.sum(1).clamp(min=1)
    tm = text_rows[b][None, :, None].float()
    txt = (A[:, b] * tm).sum(1) / tm.sum().clamp(min=1)
    return img, txt


def write_heatmaps(r, teacher, s_layers, windows, specs, titles, out_dir):
    paths = []
    vc = r.model.vision_tower.config
    patches = (vc.image_size // vc.patch_size) ** 2
    if windows is not None:
        cols_t = [f"s{s}<-t{w[0]}" + (f"..{w[-1]}" if len(w) > 1 else "") for s, w in zip(s_layers, windows)]
    else:
        cols_t = [f"layer {s}" for s in s_layers]
    k = 0
    for b, chunk in r.batches(specs, "heatmaps"):
        A_s, A_t, cols, text_rows = _matched_stack(r, b, r.model, teacher, s_layers, windows)
        for i, spec in enumerate(chunk):
            img_s, txt_s = _profiles(A_s, cols, text_rows, i)
            rows = []
            if A_t is not None:
                img_t, txt_t = _profiles(A_t, cols, text_rows, i)
                rows.append(("teacher, image queries", [patch_grid(p, patches) for p in img_t]))
            who = "student" if A_t is not None else "model"
            rows.append((f"{who}, image queries", [patch_grid(p, patches) for p in img_s]))
            if A_t is not None:
                rows.append(("teacher, text queries", [patch_grid(p, patches) for p in txt_t]))
            rows.append((f"{who}, text queries", [patch_grid(p, patches) for p in txt_s]))
            with Image.open(os.path.join(r.folder, spec[1])) as im:
                image = im.convert("RGB")
            path = os.path.join(out_dir, f"heatmap_{k:03d}.png")
            paths.append(draw_heatmaps(path, image, titles[k], rows, cols_t))
            k += 1
    return paths


# -----------------------------------------------------------------------------
# the whole evaluation


def _load_path(path):
    """The checkpoint at `path`: ours or a Hugging Face LLaVA directory, weights in one file or sharded."""
    for p in (path, path + ".old"):  # trainer.py leaves the previous checkpoint at .old after a crash mid-swap
        if has_weights(p):
            return p
    checkpoint_kind(path)  # raises, saying what is there and what is accepted
    raise FileNotFoundError(f"{path}: no checkpoint there")


def _load(m, dtype=None):
    """(VLM, its directory) from a checkpoint directory (ours or a Hugging Face LLaVA one), or (m, None) for a VLM."""
    if isinstance(m, str):
        p = _load_path(m)
        return VLM.from_pretrained(p, dtype=dtype), p
    return m, None


def evaluate(model, data_dir, tasks="vqa,cr,pope,align", teacher=None, limit=None, batch_size=16, heatmaps=0,
             out=None, cr_protocol="mcq,likelihood", image_folder=None, student_layers=None, teacher_layers=None,
             matching=None, answer_suffix="", caption_prompt=CAPTION_PROMPT, mcq_prompt=MCQ_PROMPT,
             vqa_file="", cr_dir="", pope_dir="", wino_file="", progress=True, name=None, teacher_name=None):
    """
    Run `tasks` (comma string or list from TASKS) on the test sets under `data_dir` and return the report
    dict; with `out`, also write report.json, report.md and the heat maps there. `model` / `teacher`: a
    VLM or a checkpoint directory. `limit`: items per VQA file, CR subset, POPE split and Winoground file.
    "align" needs a teacher and is skipped (with a note) without one.
    """
    t_start = time.time()
    model, model_path = _load(model)
    if model_path and torch.cuda.is_available():  # loaded here: use the GPU (a passed-in model stays put)
        model.cuda()
    teacher, teacher_path = _load(teacher) if teacher is not None else (None, None)
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    protocols = [p.strip() for p in cr_protocol.split(",")] if isinstance(cr_protocol, str) else list(cr_protocol)
    bad = [t for t in tasks if t not in TASKS] + [p for p in protocols if p not in ("mcq", "likelihood")]
    if bad:
        raise ValueError(f"unknown task / CR protocol {bad}: tasks are {TASKS}, protocols mcq and likelihood")
    if heatmaps and not out:
        raise ValueError("heatmaps need an output directory (out=...)")
    model.eval()
    if teacher is not None:
        teacher.eval()
        teacher.to(next(model.parameters()).device)
    folder = image_folder or data_dir
    r = Runner(model, folder, batch_size, progress)
    files = find_files(data_dir, vqa_file, cr_dir, pope_dir, wino_file)
    report = dict(model=name or model_path or type(model).__name__, teacher=teacher_name or teacher_path, data=data_dir,
                  image_folder=folder, tasks=tasks, limit=limit, device=str(r.device), notes=[], skipped={},
                  seconds={})

    def need(task, key):
        if not files[key]:
            raise FileNotFoundError(f"task {task}: no test file under {data_dir} (looked for test/{key}...); "
                                    f"generate the shapes world (python shapes.py) or pass its path")
        return files[key]

    cache = {}

    def vqa_items():
        if "vqa" not in cache:
            cache["vqa"], report["skipped"]["vqa"] = load_vqa(need("vqa", "vqa"), folder, limit)
        return cache["vqa"]

    def cr_items():
        if "cr" not in cache:
            cache["cr"], report["skipped"]["cr"] = load_cr(need("cr", "cr"), folder, limit)
        return cache["cr"]

    if "align" in tasks and teacher is None:
        tasks.remove("align")
        report["notes"].append("align skipped: it needs a teacher (--teacher)")
    s_layers = windows = None
    if "align" in tasks or heatmaps:
        s_layers, windows = matched_layers(model, teacher, student_layers, teacher_layers, matching)
        report["matched_layers"] = dict(student=s_layers, teacher_windows=windows)

    for task in tasks:
        t0 = time.time()
        if task == "vqa":
            report["vqa"] = run_vqa(r, vqa_items(), answer_suffix)
        elif task == "cr":
            report["cr"] = run_cr(r, cr_items(), protocols, mcq_prompt, caption_prompt)
        elif task == "pope":
            if not files["pope"]:
                need("pope", "pope")
            items, report["skipped"]["pope"] = load_pope(files["pope"], folder, limit)
            report["pope"] = run_pope(r, items, answer_suffix)
        elif task == "wino":
            items, report["skipped"]["wino"] = load_wino(need("wino", "wino"), folder, limit)
            report["wino"] = run_wino(r, items, caption_prompt)
        elif task == "align":
            report["align"] = {}
            if files["vqa"]:
                report["align"]["vqa"] = run_align(r, teacher, s_layers, windows,
                                                   [(it["question"] + answer_suffix, it["image"], None) for it in vqa_items()],
                                                   "align vqa")
            if files["cr"]:
                report["align"]["cr"] = run_align(r, teacher, s_layers, windows,
                                                  [(caption_prompt, it["image"], it["pos"]) for it in cr_items()],
                                                  "align cr")
        report["seconds"][task] = round(time.time() - t0, 2)

    if heatmaps:
        os.makedirs(out, exist_ok=True)
        specs, titles = [], []
        vqa = vqa_items()[:(heatmaps + 1) // 2] if files["vqa"] else []
        cr = cr_items()[:heatmaps - len(vqa)] if files["cr"] else []
        for it in vqa:
            specs.append((it["question"] + answer_suffix, it["image"], None))
            titles.append(f"VQA: {it['question']}  (answer: {it['answers']})")
        for it in cr:
            specs.append((caption_prompt, it["image"], it["pos"]))
            titles.append(f"CR {it['subset']}: {it['pos']}")
        t0 = time.time()
        report["heatmaps"] = write_heatmaps(r, teacher, s_layers, windows, specs, titles, out)
        report["seconds"]["heatmaps"] = round(time.time() - t0, 2)
    report["seconds"]["total"] = round(time.time() - t_start, 2)

    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(report_markdown(report))
    return report


# -----------------------------------------------------------------------------
# tables


def _pct(x, digits=1):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def compare_table(reports):
    """Markdown: one row per model (name -> report); numbers in %. CR subset cells are "MCQ / likelihood"."""
    subsets = list(dict.fromkeys(s for rep in reports.values() for s in (_get(rep, "cr", "subsets") or [])))
    head = (["model", "VQA", "CR mcq", "CR lik"] + [f"{s} (mcq/lik)" for s in subsets] +
            ["POPE F1 (gen/forced)", "Wino group", "align VQA (img/text q)", "align CR (img/text q)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rep in reports.items():
        row = [name, _pct(_get(rep, "vqa", "accuracy")), _pct(_get(rep, "cr", "mcq", "avg")),
               _pct(_get(rep, "cr", "likelihood", "avg"))]
        row += [f"{_pct(_get(rep, 'cr', 'mcq', 'per_subset', s, 'acc'))} / "
                f"{_pct(_get(rep, 'cr', 'likelihood', 'per_subset', s, 'acc'))}" for s in subsets]
        row += [f"{_pct(_get(rep, 'pope', 'generate', 'avg', 'f1'))} / {_pct(_get(rep, 'pope', 'forced', 'avg', 'f1'))}",
                _pct(_get(rep, "wino", "group"))]
        row += [f"{_pct(_get(rep, 'align', t, 'image_queries', 'vat_cos'), 2)} / "
                f"{_pct(_get(rep, 'align', t, 'text_queries', 'flat_cos'), 2)}" for t in ("vqa", "cr")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(rep):
    name = os.path.basename(os.path.normpath(rep["model"])) if isinstance(rep["model"], str) else "model"
    md = [f"# Evaluation of {rep['model']}", "", f"data: {rep['data']}; teacher: {rep['teacher']}; "
          f"limit: {rep['limit']}; device: {rep['device']}", "", compare_table({name: rep})]
    for note in rep.get("notes", []):
        md.append(f"Note: {note}\n")
    if "vqa" in rep:
        v = rep["vqa"]
        md += ["## VQA", "", f"accuracy {_pct(v['accuracy'])} on {v['n']} items", ""]
        if v["per_type"]:
            md += ["| type | accuracy |", "|---|---|"] + [f"| {k} | {_pct(a)} |" for k, a in v["per_type"].items()] + [""]
    if "cr" in rep:
        c = rep["cr"]
        md += ["## CR (SugarCrepe-style)", "",
               "| subset | n | MCQ pos (A) | MCQ pos (B) | MCQ avg | MCQ both | MCQ invalid | likelihood |",
               "|---|---|---|---|---|---|---|---|"]
        for s in c["subsets"]:
            m, l = _get(c, "mcq", "per_subset", s) or {}, _get(c, "likelihood", "per_subset", s) or {}
            n = m.get("n", l.get("n"))
            md.append(f"| {s} | {n} | {_pct(m.get('acc_pos_first'))} | {_pct(m.get('acc_pos_second'))} | "
                      f"{_pct(m.get('acc'))} | {_pct(m.get('both'))} | {_pct(m.get('invalid'))} | {_pct(l.get('acc'))} |")
        md.append(f"| **mean** | | | | {_pct(_get(c, 'mcq', 'avg'))} | | {_pct(_get(c, 'mcq', 'invalid'))} | "
                  f"{_pct(_get(c, 'likelihood', 'avg'))} |")
        if _get(c, "mcq", "unknown_words"):
            md.append(f"\nMCQ prompt words unknown to the tokenizer (<unk>): {' '.join(c['mcq']['unknown_words'])}")
        md.append("")
    if "pope" in rep:
        md += ["## POPE", "", "| split | protocol | accuracy | precision | recall | F1 | yes-ratio | invalid |",
               "|---|---|---|---|---|---|---|---|"]
        for proto in ("generate", "forced"):
            p = rep["pope"][proto]
            for s, m in list(p["per_split"].items()) + [("**mean**", p["avg"])]:
                md.append(f"| {s} | {proto} | " + " | ".join(_pct(m[k]) for k in
                          ("accuracy", "precision", "recall", "f1", "yes_ratio", "invalid")) + " |")
        md.append("")
    if "wino" in rep:
        w = rep["wino"]
        md += ["## Winoground-style", "", f"text {_pct(w['text'])}, image {_pct(w['image'])}, "
               f"group {_pct(w['group'])} on {w['n']} items", ""]
    if "align" in rep:
        md += ["## Attention alignment (student vs teacher, matched layers)", "",
               "| task | n | img q: 1 - VAT | img q: flat cos | text q: flat cos | text q: column cos | per pair (1 - VAT) |",
               "|---|---|---|---|---|---|---|"]
        for t, a in rep["align"].items():
            pp = ", ".join(f"{k} {_pct(v['vat_cos'], 2)}" for k, v in a["image_queries"]["per_pair"].items())
            md.append(f"| {t} | {a['n']} | {_pct(a['image_queries']['vat_cos'], 2)} | "
                      f"{_pct(a['image_queries']['flat_cos'], 2)} | {_pct(a['text_queries']['flat_cos'], 2)} | "
                      f"{_pct(a['text_queries']['column_cos'], 2)} | {pp} |")
        md.append("")
    if rep.get("heatmaps"):
        md += ["## Attention heat maps", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in rep["heatmaps"]]
    return "\n".join(md) + "\n"


# -----------------------------------------------------------------------------
# command line

DEFAULTS = dict(
    model="",                 # checkpoint directory (any stage's out_dir)
    compare="",               # instead of model: "name=dir,name=dir,..." -> <out>/<name>/ each + <out>/report.md table
    teacher="",               # teacher checkpoint directory: enables "align" and the teacher rows of heat maps
    tasks="vqa,cr,pope,align",  # any of vqa, cr, pope, wino, align
    data="out/shapes",        # folder holding test/ (shapes) or the benchmark files
    image_folder="",          # default: data; the folder the files' image paths are relative to
    out="",                   # default: <model>/eval
    heatmaps=0,               # number of attention heat-map PNGs
    batch_size=16,
    limit=0,                  # >0: items per VQA file / CR subset / POPE split / Winoground file
    cr_protocol="mcq,likelihood",
    student_layers=None, teacher_layers=None, matching="",  # default: the student's training config, else presets
    answer_suffix="",         # appended to VQA / POPE questions (LLaVA: "\nAnswer the question using a single word or phrase.")
    caption_prompt=CAPTION_PROMPT,
    mcq_prompt=MCQ_PROMPT,
    vqa_file="", cr_dir="", pope_dir="", wino_file="",
    dtype="auto",             # auto: bfloat16 weights on CUDA, float32 on CPU
)


def main(argv=None):
    """One model (--model, report in --out or <model>/eval), or several (--compare="name=dir,...": each
    into <out>/<name>, plus one comparison table in <out>/report.md). Returns the report(s)."""
    from configurator import configure
    cfg = configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv)
    if not cfg["model"] and not cfg["compare"]:
        raise ValueError("give --model=<checkpoint dir>, or --compare=name=dir,name=dir with --out=<dir>")
    if cfg["compare"] and not cfg["out"]:
        raise ValueError("--compare needs --out=<dir> for the comparison table")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg["dtype"]]
    teacher = _load(cfg["teacher"], dtype)[0].to(device) if cfg["teacher"] else None
    opts = {k: cfg[k] for k in ("tasks", "batch_size", "heatmaps", "cr_protocol", "student_layers", "teacher_layers",
                                "answer_suffix", "caption_prompt", "mcq_prompt", "vqa_file", "cr_dir", "pope_dir",
                                "wino_file")}
    opts.update(limit=cfg["limit"] or None, image_folder=cfg["image_folder"] or None, matching=cfg["matching"] or None)
    if cfg["compare"]:
        runs = [tuple(x.split("=", 1)) for x in cfg["compare"].split(",")]
        if any(len(r) != 2 for r in runs):
            raise ValueError(f"--compare={cfg['compare']!r}: write name=dir pairs separated by commas")
    else:
        runs = [(None, cfg["model"])]
    reports = {}
    for name, path in runs:
        model, path = _load(path, dtype)
        # the teacher compared with itself says nothing: evaluate it alone (its heat maps show its own attention)
        own = teacher is not None and os.path.realpath(path) == os.path.realpath(_load_path(cfg["teacher"]))
        out = os.path.join(cfg["out"], name) if name else cfg["out"] or os.path.join(path, "eval")
        rep = evaluate(model.to(device), cfg["data"], teacher=None if own else teacher, out=out, name=path,
                       teacher_name=None if own else cfg["teacher"] or None, **opts)
        print(report_markdown(rep))
        print(f"-> {out}/report.json, report.md")
        reports[name or path] = rep
        del model
    if not cfg["compare"]:
        return next(iter(reports.values()))
    table = compare_table(reports)
    with open(os.path.join(cfg["out"], "report.json"), "w") as f:
        json.dump(reports, f, indent=1)
    with open(os.path.join(cfg["out"], "report.md"), "w") as f:
        f.write(f"# Comparison on {cfg['data']}\n\n{table}\n" +
                "".join(f"- [{n}]({n}/report.md): {r['model']}\n" for n, r in reports.items()))
    print(table)
    print(f"-> {cfg['out']}/report.md")
    return reports


if __name__ == "__main__":
    main()
