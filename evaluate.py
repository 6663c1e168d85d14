"""
Evaluation: VQA, compositional reasoning (SugarCrepe-style CR, Winoground/BiVLC-style), POPE, and the paper's
diagnosis, the teacher-student attention alignment with its heat maps (alignment.py).

    python evaluate.py --model=out/shapes/sft --teacher=out/shapes/teacher --data=out/shapes --heatmaps=4
    python evaluate.py --compare=teacher=out/shapes/teacher,sft=out/shapes/sft --teacher=out/shapes/teacher \
        --data=out/shapes --out=out/shapes/eval        # several models, one table

writes report.json (every number, fractions in [0, 1]) and report.md to --out (default <model>/eval) and prints
the table. From Python: report = evaluate(model, "out/shapes", teacher=teacher, tasks="cr,align"), with the
settings of DEFAULTS below as keywords.

Inputs (shapes.py writes the first three under <data>/test/; real benchmarks in the same formats work with
--image_folder pointing at their images):
  vqa.jsonl          {"question" | "text", "answer" (str) | "answers" (list of str or {"answer"}), "image"}; with
                     "answer_type": "yes/no" (as VQAv2 marks them) the answer's verdict is scored (parse_yes_no)
  cr/{subset}.json   SugarCrepe: {id: {"filename", "caption", "negative_caption"}}
  pope_*.json[l]     {"question" | "text", "answer" | "label" ("yes"/"no"), "image", "category"}
  winoground.jsonl   {"image_0", "image_1", "caption_0", "caption_1"} (Winoground) or
                     {"image", "negative_image", "caption", "negative_caption"} (BiVLC)
  reefknot/          Reefknot's layout: YESNO.jsonl, Multichoice.jsonl, VQA.jsonl, one {"image_id", "query_prompt",
                     "label", "relation_type"} a line; the image is <image_id>.jpg or .png under
                     --reefknot_image_folder (else --image_folder; for the shapes layout, <data>/images).
                     --reefknot_dir points at the official download.
An item whose image is missing or is not an image is skipped, counted in the report's "skipped" and named in a
warning; a test file none of whose images can be read stops the run.

Protocols. Every prompt goes through data.tokenize_conversation with a last human turn, so it ends exactly as in
training.
  vqa    greedy short answer; normalised exact match (VQA soft accuracy min(1, #matches / 3) for a list).
  cr     mcq: MCQ_PROMPT asked in both orders (positive as (A), then as (B)), greedy, accuracy per order and
         averaged, per subset and the unweighted mean. likelihood: length-normalised log P(caption + <eos> |
         image, caption_prompt) of the positive vs the negative caption.
  wino   text / image / group scores from the 2x2 likelihood table.
  pope   generate: read as POPE's own evaluation does (parse_yes_no: "no"/"not" in the first sentence, else "yes";
         an answer with neither is invalid and counted wrong); forced: "yes" vs
         "no" log-probability at the first answer position. Accuracy, precision, recall, F1 (positive class
         "yes"), yes-ratio and invalid rate per split.
  reefknot  relation hallucination, Reefknot's scoring: greedy answers to each query_prompt; YESNO: "yes" when the
         answer contains the word yes, else "no"; Multichoice: the answer's first letter; VQA: the label's words
         appear, in order, in the answer. Per task: accuracy and hallucination rate (1 - accuracy), overall and by
         relation_type (perception / cognition); their mean over the tasks (1 - it is Reefknot's R-score).
  align  (needs a teacher) see alignment.py: in the matched layers, 1 - the paper's VAT distance (all queries, the
         training default), 1 - the reference code's (image queries), and the text queries' similarity.
Precision: the models compute in the dtype their weights are loaded in (--dtype; auto = bfloat16 on CUDA, float32 on
the CPU), without autocast, as sample.py does; a VLM passed in from Python computes in its own dtype.
For real models set answer_suffix (e.g. LLaVA's "\nAnswer the question using a single word or phrase.") and
caption_prompt to what they were trained with. The shapes models are never trained on multiple choice: their
MCQ scores sit near chance; the likelihood protocol is the informative one there.
"""

import json
import math
import os
import re
import sys
import time
import warnings
from collections import OrderedDict, defaultdict

import torch
from PIL import Image
from tqdm import tqdm

from alignment import matched_layers, run_align, write_heatmaps
from checkpoint import find_checkpoint
from common import pick_device, resolve_dtype, why
from data import IGNORE_INDEX, collate, decode_answer, json_lines, load_image, tokenize_conversation
from model import VLM

TASKS = ["vqa", "cr", "pope", "wino", "reefknot", "align"]
REEFKNOT_FILES = {"yesno": "YESNO.jsonl", "multichoice": "Multichoice.jsonl", "vqa": "VQA.jsonl"}
CR_ORDER = ["swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel", "add_obj", "add_att"]
CAPTION_PROMPT = "describe the image ."  # = shapes.PROMPT, the LLaVA-pretrain style prompt of the captions
MCQ_PROMPT = "Which caption describes the image?\n(A) {a}\n(B) {b}\nAnswer with A or B."
# room for an answer that explains itself ("the red one is a square , so no"); mcq: for one that repeats a caption
MAX_NEW_TOKENS = dict(vqa=20, pope=20, mcq=40, reefknot=20)
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
    """'yes' / 'no' from an answer as POPE's own evaluation reads it: its first sentence says no when it holds the
    word "no" or "not", else yes when it holds "yes"; an answer with neither is None (invalid, counted wrong). So "No,
    there is none", "Yes." and "the red one is a square , so no" all count."""
    words = re.findall(r"[a-z]+", re.split(r"(?<!\d)\.(?!\d)", answer.lower(), maxsplit=1)[0])
    if "no" in words or "not" in words:
        return "no"
    return "yes" if "yes" in words else None


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


def reefknot_correct(task, answer, label):
    """Is a free-form answer right, by Reefknot's rules? yesno: "yes" when the answer holds the word yes (else "no"),
    against the label; multichoice: the first letter of the answer (after an opening bracket) is the label's letter;
    vqa: the label's words occur in the answer's words, in order and next to each other."""
    words = _words(answer).split()
    if task == "yesno":
        return ("yes" if "yes" in words else "no") == str(label).strip().lower()
    if task == "multichoice":
        letter = answer.strip().lstrip("([ ").upper()[:1]
        return letter != "" and letter == str(label).strip().upper()[:1]
    if task == "vqa":
        want = _words(label).split()
        return bool(want) and any(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1))
    raise ValueError(f"unknown Reefknot task {task!r}: use {list(REEFKNOT_FILES)}")


def reefknot_metrics(correct, tasks, relation_types, answers=None):
    """Accuracy and hallucination rate (1 - accuracy) per task, overall and per relation type, and their mean over
    the tasks present (Reefknot's R-score is 1 - that mean hallucination rate, i.e. the mean accuracy)."""
    def score(ok):
        acc = _mean(ok)
        return dict(n=len(ok), accuracy=acc, hallucination_rate=1.0 - acc)
    report = {}
    for task in REEFKNOT_FILES:
        idx = [i for i, t in enumerate(tasks) if t == task]
        if not idx:
            continue
        rep = score([correct[i] for i in idx])
        rep["by_relation_type"] = {rt: score([correct[i] for i in idx if relation_types[i] == rt])
                                   for rt in sorted({relation_types[i] for i in idx})}
        if task == "yesno" and answers is not None:
            rep["yes_ratio"] = _mean("yes" in _words(answers[i]).split() for i in idx)
        report[task] = rep
    present = [t for t in REEFKNOT_FILES if t in report]
    report["mean"] = dict(accuracy=_mean(report[t]["accuracy"] for t in present),
                          hallucination_rate=_mean(report[t]["hallucination_rate"] for t in present), tasks=present)
    return report


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
        return json_lines(text, path)


def _field(row, key, path):
    """row[key], or an error that names the file and the item (a benchmark file of another layout)."""
    if not isinstance(row, dict) or key not in row:
        raise ValueError(f"{path}: item {str(row)[:80]!r} has no {key!r}; see evaluate.py's docstring for the layouts "
                         "it reads")
    return row[key]


def _read_list(path):
    rows = _read_rows(path)
    return [rows] if isinstance(rows, dict) else rows  # a one-line JSON-lines file parses as one object


def _first_existing(*paths):
    return next((p for p in paths if p and os.path.exists(p)), None)


def _image_problem(path, cache):
    """Why the image at `path` cannot be used ("missing", or what reading it said), or None; cached per path (many
    items share an image)."""
    if path not in cache:
        if not os.path.isfile(path):
            cache[path] = "missing"
        else:
            try:
                with Image.open(path) as im:
                    im.verify()  # the file's structure, without decoding it: the evaluation decodes it once, later
                cache[path] = None
            except (OSError, ValueError, SyntaxError) as e:  # not an image, or a damaged one
                cache[path] = why(e)
    return cache[path]


def _keep_with_images(items, keys, folder, task):
    """Drop (and count) items whose image files are missing or are not images: a few bad rows must not stop a long
    run; none left is an error."""
    kept, missing, unreadable, cache = [], [], [], {}
    for it in items:
        bad = [(p, why) for p in (os.path.join(folder, it[k]) for k in keys) if (why := _image_problem(p, cache))]
        if not bad:
            kept.append(it)
        elif bad[0][1] == "missing":
            missing.append(bad[0][0])
        else:
            unreadable.append(bad[0])
    if (missing or unreadable) and not kept:
        if not unreadable:
            raise FileNotFoundError(f"{task}: none of the {len(missing)} items' images exist (e.g. {missing[0]}); "
                                    "set --image_folder to the folder the test file's image paths are relative to")
        raise ValueError(f"{task}: none of the {len(missing) + len(unreadable)} items' images can be read "
                         f"({len(unreadable)} not images, e.g. {unreadable[0][0]} ({unreadable[0][1]}); "
                         f"{len(missing)} missing); check the test file's images and --image_folder")
    if missing:
        warnings.warn(f"{task}: skipping {len(missing)} items whose images are missing (e.g. {missing[0]})")
    if unreadable:
        warnings.warn(f"{task}: skipping {len(unreadable)} items whose images cannot be read (e.g. "
                      f"{unreadable[0][0]}: {unreadable[0][1]})")
    return kept, len(missing) + len(unreadable)


def load_vqa(path, folder, limit=None):
    items = []
    for r in _read_list(path)[:limit or None]:
        answers = r.get("answers", r.get("answer"))
        if answers is None:
            raise ValueError(f"{path}: item {r.get('question_id', r.get('id'))!r} has no 'answer' / 'answers' "
                             "(a test-dev file without answers is scored by the benchmark's own server)")
        if isinstance(answers, list):
            answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
        items.append(dict(question=r.get("question", r.get("text")), answers=answers,
                          image=_field(r, "image", path),
                          type=r.get("type", r.get("question_type", r.get("category"))),
                          yes_no=r.get("answer_type") == "yes/no"))
    return _keep_with_images(items, ["image"], folder, f"vqa ({path})")


def cr_subsets(cr_dir):
    names = [f[:-5] for f in os.listdir(cr_dir) if f.endswith(".json")]
    return [s for s in CR_ORDER if s in names] + sorted(s for s in names if s not in CR_ORDER)


def load_cr(cr_dir, folder, limit=None):
    items, skipped = [], 0
    for subset in cr_subsets(cr_dir):
        rows = _read_rows(os.path.join(cr_dir, subset + ".json"))
        rows = list(rows.values()) if isinstance(rows, dict) else rows
        where = os.path.join(cr_dir, subset + ".json")
        sub = [dict(subset=subset, image=_field(r, "filename", where), pos=_field(r, "caption", where),
                    neg=_field(r, "negative_caption", where)) for r in rows[:limit or None]]
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
                     image=_field(r, "image", path)))
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


def reefknot_image(image_id, folder):
    """The image file of a Reefknot item: <image_id> itself if it names a file, else <image_id>.jpg or .png."""
    image_id = str(image_id)
    for name in (image_id, image_id + ".jpg", image_id + ".png"):
        if os.path.splitext(name)[1] and os.path.isfile(os.path.join(folder, name)):
            return name
    return image_id + ".jpg"  # missing: _keep_with_images skips and counts it


def load_reefknot(reefknot_dir, folder, limit=None):
    """Items of the Reefknot files present in reefknot_dir (at least one of REEFKNOT_FILES)."""
    found = {t: os.path.join(reefknot_dir, f) for t, f in REEFKNOT_FILES.items()
             if os.path.isfile(os.path.join(reefknot_dir, f))}
    if not found:
        raise FileNotFoundError(f"reefknot: none of {list(REEFKNOT_FILES.values())} in {reefknot_dir}; point "
                                "--reefknot_dir at the folder of the Reefknot download (or generate the shapes world)")
    items, skipped = [], 0
    for task, path in found.items():
        rows = []
        for k, r in enumerate(_read_list(path)[:limit or None]):
            missing = [f for f in ("image_id", "query_prompt", "label") if f not in r]
            if missing:
                raise ValueError(f"{path}: line {k + 1} has no {missing}; Reefknot items hold image_id, query_prompt, "
                                 "label (and relation_type)")
            rows.append(dict(task=task, image=reefknot_image(r["image_id"], folder), query=r["query_prompt"],
                             label=str(r["label"]), relation_type=r.get("relation_type") or "unspecified"))
        rows, k = _keep_with_images(rows, ["image"], folder, f"reefknot/{REEFKNOT_FILES[task]}")
        items += rows
        skipped += k
    return items, skipped


def find_files(data_dir, vqa_file="", cr_dir="", pope_dir="", wino_file="", reefknot_dir=""):
    """The test files under data_dir (shapes layout <data>/test/..., or directly in <data>), or the overrides."""
    t = os.path.join(data_dir, "test")
    pope_dir = pope_dir or _first_existing(t, data_dir) or data_dir
    pope = sorted(os.path.join(pope_dir, f) for f in os.listdir(pope_dir)
                  if "pope_" in f and f.endswith((".json", ".jsonl"))) if os.path.isdir(pope_dir) else []
    return dict(vqa=vqa_file or _first_existing(os.path.join(t, "vqa.jsonl"), os.path.join(data_dir, "vqa.jsonl")),
                cr=cr_dir or _first_existing(os.path.join(t, "cr"), os.path.join(data_dir, "cr")),
                pope=pope,
                wino=wino_file or _first_existing(os.path.join(t, "winoground.jsonl"),
                                                  os.path.join(data_dir, "winoground.jsonl")),
                reefknot=reefknot_dir or _first_existing(os.path.join(t, "reefknot"), os.path.join(data_dir, "reefknot")))


# -----------------------------------------------------------------------------
# running the model: prompts -> batches -> answers / log-probabilities / attention


class Runner:
    """The model, its tokenizer and image processor, a small image cache, and the batch loop. The model computes in
    the dtype of its weights (no autocast): the dtype it was loaded in decides, as in sample.py."""

    def __init__(self, model, image_folder, batch_size=16, progress=True, cache_size=256):
        if model.tokenizer is None or model.image_processor is None:
            raise ValueError("the model has no tokenizer / image_processor attached; load it with "
                             "VLM.from_pretrained(<checkpoint dir>) or set model.tokenizer / model.image_processor")
        self.model, self.tok, self.proc = model, model.tokenizer, model.image_processor
        self.folder, self.batch_size, self.progress = image_folder, batch_size, progress
        self.device = next(model.parameters()).device
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self._cache, self._cache_size = OrderedDict(), cache_size

    def pixels(self, rel):
        if rel not in self._cache:
            path = os.path.join(self.folder, rel)
            try:
                img = load_image(path)
            except (OSError, ValueError, SyntaxError) as e:  # damaged past what the check before the run sees
                raise ValueError(f"{path}: cannot be read as an image ({why(e)}); replace "
                                 "the file, or remove its items from the test file") from e
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
            new = self.model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], max_new_tokens)
            out += [decode_answer(self.tok, row) for row in new]
        return out

    def _hidden(self, b):
        m = self.model
        return m.hidden_states(b["input_ids"], b["attention_mask"], m.image_embeds(b["pixel_values"]))

    @torch.no_grad()
    def loglik(self, specs, desc):
        """Mean log-probability of each spec's answer tokens (its <eos> included) given image and prompt."""
        out = []
        for b, _ in self.batches(specs, desc):
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
    # a yes/no question (VQAv2's answer_type "yes/no") is scored on the verdict, read as POPE reads it
    scores = [vqa_score(parse_yes_no(p) or "", it["answers"]) if it.get("yes_no") else vqa_score(p, it["answers"])
              for p, it in zip(preds, items)]
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


def run_reefknot(r, items, answer_suffix=""):
    answers = r.generate([(it["query"] + answer_suffix, it["image"], None) for it in items], MAX_NEW_TOKENS["reefknot"],
                         "reefknot")
    correct = [reefknot_correct(it["task"], a, it["label"]) for it, a in zip(items, answers)]
    rep = reefknot_metrics(correct, [it["task"] for it in items], [it["relation_type"] for it in items], answers)
    rep["examples"] = [dict(task=it["task"], query=it["query"], label=it["label"], answer=a, correct=ok)
                       for it, a, ok in list(zip(items, answers, correct))[:8]]
    return rep


def run_wino(r, items, caption_prompt=CAPTION_PROMPT):
    specs = [(caption_prompt, it["images"][j], it["captions"][i]) for it in items for i in (0, 1) for j in (0, 1)]
    lp = r.loglik(specs, "wino")
    per = [winoground_scores([[lp[4 * k], lp[4 * k + 1]], [lp[4 * k + 2], lp[4 * k + 3]]]) for k in range(len(items))]
    return dict(n=len(items), **{k: _mean(p[k] for p in per) for k in ("text", "image", "group")})


# -----------------------------------------------------------------------------
# the whole evaluation


def _load(m, dtype=None):
    """(VLM, its directory) from a checkpoint directory (ours or a Hugging Face LLaVA one), or (m, None) for a VLM."""
    if isinstance(m, str):
        return VLM.from_pretrained(m, dtype=dtype), find_checkpoint(m) or m
    return m, None


def evaluate(model, data, teacher=None, out="", progress=True, name=None, teacher_name=None, **settings):
    """
    Run the tasks on the test sets under `data` and return the report dict; with `out`, also write report.json,
    report.md and the heat maps there. `model` / `teacher`: a VLM or a checkpoint directory. `settings`: the
    evaluation settings of DEFAULTS (tasks, limit, heatmaps, prompts, files...). "align" needs a teacher and is
    skipped (with a note) without one.
    """
    unknown = sorted(set(settings) - set(DEFAULTS) | set(settings) & CLI_ONLY)
    if unknown:
        raise ValueError(f"unknown evaluation settings {unknown}: use those of evaluate.DEFAULTS")
    o = {k: v for k, v in dict(DEFAULTS, **settings).items() if k not in CLI_ONLY}
    tasks, limit, batch_size, heatmaps = o["tasks"], o["limit"] or None, o["batch_size"], o["heatmaps"]
    answer_suffix, caption_prompt = o["answer_suffix"], o["caption_prompt"]
    data_dir = data
    t_start = time.time()
    model, model_path = _load(model)
    if model_path and torch.cuda.is_available():  # loaded here: use the GPU (a passed-in model stays put)
        model.cuda()
    teacher, teacher_path = _load(teacher) if teacher is not None else (None, None)
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    protocols = [p.strip() for p in o["cr_protocol"].split(",")] if isinstance(o["cr_protocol"], str) else list(o["cr_protocol"])
    bad = [t for t in tasks if t not in TASKS] + [p for p in protocols if p not in ("mcq", "likelihood")]
    if bad:
        raise ValueError(f"unknown task / CR protocol {bad}: tasks are {TASKS}, protocols mcq and likelihood")
    if heatmaps and not out:
        raise ValueError("heatmaps need an output directory (out=...)")
    model.eval()
    if teacher is not None:
        teacher.eval()
        teacher.to(next(model.parameters()).device)
    folder = o["image_folder"] or data_dir
    r = Runner(model, folder, batch_size, progress)
    files = find_files(data_dir, o["vqa_file"], o["cr_dir"], o["pope_dir"], o["wino_file"], o["reefknot_dir"])
    report = dict(model=name or model_path or type(model).__name__, teacher=teacher_name or teacher_path, data=data_dir,
                  image_folder=folder, tasks=tasks, limit=limit, device=str(r.device), notes=[], skipped={},
                  seconds={})

    def need(task, key):
        if not files[key]:
            raise FileNotFoundError(f"task {task}: no test file under {data_dir} (looked for test/{key}...); "
                                    f"generate the shapes world (python shapes.py), pass its path, or leave the task "
                                    f"out of --tasks")
        return files[key]

    for task in tasks:  # every test file is found before the first task runs, not after an hour of the others
        if task != "align":
            need(task, task)
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
    pairs = None
    if "align" in tasks or heatmaps:
        pairs = matched_layers(model, teacher, o["student_layers"], o["teacher_layers"], o["matching"] or None)
        report["matched_layers"] = dict(student=pairs.student, teacher_windows=pairs.windows)

    for task in tasks:
        t0 = time.time()
        if task == "vqa":
            report["vqa"] = run_vqa(r, vqa_items(), answer_suffix)
        elif task == "cr":
            report["cr"] = run_cr(r, cr_items(), protocols, o["mcq_prompt"], caption_prompt)
        elif task == "pope":
            if not files["pope"]:
                need("pope", "pope")
            items, report["skipped"]["pope"] = load_pope(files["pope"], folder, limit)
            report["pope"] = run_pope(r, items, answer_suffix)
        elif task == "wino":
            items, report["skipped"]["wino"] = load_wino(need("wino", "wino"), folder, limit)
            report["wino"] = run_wino(r, items, caption_prompt)
        elif task == "reefknot":
            # Reefknot names images by id; the shapes world keeps them in <data>/images
            shapes_images = os.path.join(data_dir, "images")
            rk_folder = o["reefknot_image_folder"] or o["image_folder"] or \
                (shapes_images if os.path.isdir(shapes_images) else data_dir)
            items, report["skipped"]["reefknot"] = load_reefknot(need("reefknot", "reefknot"), rk_folder, limit)
            report["reefknot"] = run_reefknot(Runner(model, rk_folder, batch_size, progress), items)
        elif task == "align":
            report["align"] = {}
            if files["vqa"]:
                report["align"]["vqa"] = run_align(r, teacher, pairs,
                                                   [(it["question"] + answer_suffix, it["image"], None) for it in vqa_items()],
                                                   "align vqa")
            if files["cr"]:
                report["align"]["cr"] = run_align(r, teacher, pairs,
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
        report["heatmaps"] = write_heatmaps(r, teacher, pairs, specs, titles, out)
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
            ["POPE F1 (gen/forced)", "Wino group", "Reefknot halluc. (yes-no / mc / vqa / mean)",
             "align VQA (all / img / text q)", "align CR (all / img / text q)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rep in reports.items():
        row = [name, _pct(_get(rep, "vqa", "accuracy")), _pct(_get(rep, "cr", "mcq", "avg")),
               _pct(_get(rep, "cr", "likelihood", "avg"))]
        row += [f"{_pct(_get(rep, 'cr', 'mcq', 'per_subset', s, 'acc'))} / "
                f"{_pct(_get(rep, 'cr', 'likelihood', 'per_subset', s, 'acc'))}" for s in subsets]
        row += [f"{_pct(_get(rep, 'pope', 'generate', 'avg', 'f1'))} / {_pct(_get(rep, 'pope', 'forced', 'avg', 'f1'))}",
                _pct(_get(rep, "wino", "group")),
                " / ".join(_pct(_get(rep, "reefknot", t, "hallucination_rate")) for t in (*REEFKNOT_FILES, "mean"))]
        row += [" / ".join(_pct(_get(rep, "align", t, *form), 2) for form in
                           (("all_queries", "vat_cos"), ("image_queries", "vat_cos"), ("text_queries", "flat_cos")))
                for t in ("vqa", "cr")]
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
    if "reefknot" in rep:
        rk = rep["reefknot"]
        types = sorted({rt for t in REEFKNOT_FILES if t in rk for rt in rk[t]["by_relation_type"]})
        md += ["## Reefknot (relation hallucination)", "",
               "| task | n | accuracy | hallucination rate | " + " | ".join(f"halluc. {rt}" for rt in types) + " |",
               "|---|---|---|---|" + "---|" * len(types)]
        for t in REEFKNOT_FILES:
            if t in rk:
                by = rk[t]["by_relation_type"]
                md.append(f"| {t} | {rk[t]['n']} | {_pct(rk[t]['accuracy'])} | {_pct(rk[t]['hallucination_rate'])} | " +
                          " | ".join(_pct(_get(by, rt, "hallucination_rate")) for rt in types) + " |")
        md.append(f"| **mean** | | {_pct(rk['mean']['accuracy'])} | {_pct(rk['mean']['hallucination_rate'])} |" +
                  " |" * len(types))
        if "yesno" in rk:
            md.append(f"\nYESNO yes-ratio {_pct(rk['yesno']['yes_ratio'])}")
        md.append("")
    if "align" in rep:
        md += ["## Attention alignment (student vs teacher, matched layers)", "",
               "| task | n | all q: 1 - paper VAT | img q: 1 - reference VAT | img q: flat cos | text q: flat cos | "
               "text q: column cos | per pair (img q, 1 - VAT) |",
               "|---|---|---|---|---|---|---|---|"]
        for t, a in rep["align"].items():
            pp = ", ".join(f"{k} {_pct(v['vat_cos'], 2)}" for k, v in a["image_queries"]["per_pair"].items())
            md.append(f"| {t} | {a['n']} | {_pct(a['all_queries']['vat_cos'], 2)} | {_pct(a['image_queries']['vat_cos'], 2)} | "
                      f"{_pct(a['image_queries']['flat_cos'], 2)} | {_pct(a['text_queries']['flat_cos'], 2)} | "
                      f"{_pct(a['text_queries']['column_cos'], 2)} | {pp} |")
        md.append("")
    if rep.get("heatmaps"):
        md += ["## Attention heat maps", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in rep["heatmaps"]]
    return "\n".join(md) + "\n"


# -----------------------------------------------------------------------------
# command line

DEFAULTS = dict(
    model="",                 # checkpoint directory: any stage's out_dir, or a Hugging Face LLaVA directory
    compare="",               # instead of model: "name=dir,name=dir,..." -> <out>/<name>/ each + <out>/report.md table
    teacher="",               # teacher checkpoint directory: enables "align" and the teacher rows of heat maps
    data="out/shapes",        # folder holding test/ (shapes) or the benchmark files
    out="",                   # where the report goes (default: <model>/eval)
    dtype="auto",             # the models load and compute in it (no autocast): auto = bfloat16 on CUDA, float32
                              # on CPU; or float32 / bfloat16
    tasks="vqa,cr,pope,reefknot,align",  # any of vqa, cr, pope, wino, reefknot, align
    limit=0,                  # >0: items per VQA file / CR subset / POPE split / Winoground file / Reefknot file
    batch_size=16,            # prompts per forward
    heatmaps=0,               # number of attention heat-map PNGs (half VQA, half CR items)
    cr_protocol="mcq,likelihood",  # CR protocols: mcq and / or likelihood
    image_folder="",          # the folder the files' image paths are relative to (default: data)
    student_layers=None,      # the layer pairs to align (default: the student's training config, else presets)
    teacher_layers=None,      # (as student_layers)
    matching="",              # group | simple | adaptive (default: the student's training config)
    answer_suffix="",         # appended to VQA / POPE questions (LLaVA: "\nAnswer the question using a single word or phrase.")
    caption_prompt=CAPTION_PROMPT,  # the prompt CR captions are scored after
    mcq_prompt=MCQ_PROMPT,    # CR's multiple-choice question ({a}, {b}: the two captions)
    vqa_file="",              # the files, when they are not where shapes.py puts them under data:
    cr_dir="",                # a VQA .jsonl, a folder of SugarCrepe .json subsets,
    pope_dir="",              # a folder of POPE files,
    wino_file="",             # a Winoground / BiVLC .jsonl
    reefknot_dir="",          # a folder with Reefknot's YESNO.jsonl, Multichoice.jsonl, VQA.jsonl
    reefknot_image_folder="", # where Reefknot's <image_id>.jpg are (Visual Genome), when not image_folder (e.g. COCO
                              # for POPE); default for the shapes layout: <data>/images
)
CLI_ONLY = {"model", "compare", "teacher", "data", "out", "dtype"}  # the rest are evaluate()'s settings


def main(argv=None):
    """One model (--model, report in --out or <model>/eval), or several (--compare="name=dir,...": each
    into <out>/<name>, plus one comparison table in <out>/report.md). Returns the report(s)."""
    from configurator import configure
    cfg = configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv, __doc__, [__file__])
    if not cfg["model"] and not cfg["compare"]:
        raise ValueError("give --model=<checkpoint dir>, or --compare=name=dir,name=dir with --out=<dir>")
    if cfg["compare"] and not cfg["out"]:
        raise ValueError("--compare needs --out=<dir> for the comparison table")
    device = pick_device()
    dtype = resolve_dtype(cfg["dtype"], device)
    teacher, teacher_path = _load(cfg["teacher"], dtype) if cfg["teacher"] else (None, None)
    if teacher is not None:
        teacher.to(device)
    opts = {k: v for k, v in cfg.items() if k not in CLI_ONLY}
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
        own = teacher is not None and os.path.realpath(path) == os.path.realpath(teacher_path)
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
    from configurator import cli
    cli(main)
