"""
Evaluation: VQA, compositional reasoning (SugarCrepe-style CR, Winoground/BiVLC-style), POPE, Reefknot, and the paper's
diagnosis, the teacher-student attention alignment with its heat maps (alignment.py).

    python evaluate.py --model=out/shapes/sft --teacher=out/shapes/teacher --data=out/shapes --heatmaps=4
    python evaluate.py --compare=teacher=out/shapes/teacher,sft=out/shapes/sft --teacher=out/shapes/teacher \
        --data=out/shapes --out=out/shapes/eval        # several models, one table
    python evaluate.py --predictions=answers/ --data=bench/     # answers made elsewhere (vLLM, lmms-eval...): no model

writes report.json (every number, fractions in [0, 1]) and report.md to --out (default <model>_eval, beside the
checkpoint: never inside it, where the next save of a resumed run would replace it) and prints the table. The report
is rewritten after each task: a run stopped by Ctrl-C keeps the tasks it finished and says "status": "interrupted".
From Python: report = evaluate(model, "out/shapes", teacher=teacher, tasks="cr,align"), with the settings of DEFAULTS
below as keywords.

Inputs (shapes.py writes the first three under <data>/test/; real benchmarks in the same formats work with
--image_folder naming the folder(s) of their images: several comma-separated, searched in order; a name without an
extension is also tried as .jpg / .png / .jpeg):
  vqa.jsonl          {"question" | "text", "answer" (str) | "answers" (list of str or {"answer"}), "image"}, optional
                     "question_id", "answer_type" ("yes/no" also gets the verdict figure, below)
  cr/{subset}.json   SugarCrepe: {id: {"filename", "caption", "negative_caption"}}
  pope_*.json[l]     POPE's layout (coco_pope_*.json: {"question_id", "image", "text", "label"}) or {"question",
                     "answer", "image", "category"}; a label other than "yes" / "no" is an error naming file and line
  winoground.jsonl   {"image_0", "image_1", "caption_0", "caption_1"} (Winoground) or
                     {"image", "negative_image", "caption", "negative_caption"} (BiVLC)
  reefknot/          Reefknot's layout: YESNO.jsonl, Multichoice.jsonl, VQA.jsonl, one {"image_id", "query_prompt",
                     "label", "relation_type"} a line; the image is <image_id>.jpg (or .png) in --reefknot_image_folder
                     (else --image_folder; for the shapes layout, <data>/images): Visual Genome's two folders as
                     --reefknot_image_folder=VG_100K,VG_100K_2. --reefknot_dir points at the official download.
An item whose image is missing or is not an image is skipped and counted: every table shows each task's n and the
skipped count (report.json "skipped"), and a warning names one; a test file none of whose images can be read stops
the run. A missing label / answer field is an error naming the file and line.

--predictions=DIR scores answers made elsewhere, with no model and no images (tasks vqa, pope, reefknot): for each
benchmark file scored, DIR holds a file of the same name (vqa.jsonl, coco_pope_random.json, YESNO.jsonl...) with one
JSON object a line, {"text": answer} (or "answer") plus "question_id" where the benchmark has one (LLaVA's answer
files). Lines are matched by question_id when both files have it, else by position; a count that differs, an unknown
or unanswered question_id stops with one line naming the file.

Readings: each benchmark's answers are read as its official script reads them, and the report says so per task
("reading"); our stricter readings are extra figures beside them, never in their place.
  vqa    greedy short answer; VQAv2's evaluation (vqaEval.py): punctuation, articles, number words (none -> 0) and
         contractions normalised; accuracy = the mean over the leave-one-out subsets of the annotators' answers of
         min(1, #matches / 3) (3 of 10: 0.9). One answer: normalised exact match (ours). Extra figure, ours: "verdict",
         a yes/no question scored on the verdict its answer states (parse_yes_no), for answers that explain themselves.
  cr     (ours) mcq: MCQ_PROMPT asked in both orders (positive as (A), then as (B)), greedy, accuracy per order and
         averaged, per subset and the unweighted mean. likelihood: length-normalised log P(caption + <eos> |
         image, caption_prompt) of the positive vs the negative caption.
  wino   text / image / group scores from the 2x2 likelihood table.
  pope   generate: POPE's evaluate.py (as LLaVA's eval_pope.py): the text before the first ".", commas dropped, split
         on spaces; "no" iff a word is exactly No / not / no, everything else "yes". Accuracy, precision, recall, F1
         (positive class "yes"), yes-ratio per split; extra column, ours: invalid (neither yes nor no, case-folded).
         forced (ours, a model only): "yes" vs "no" log-probability at the first answer position.
  reefknot  relation hallucination: greedy answers to each query_prompt (at most MAX_NEW_TOKENS["reefknot"] tokens);
         YESNO and Multichoice as Reefknot's utils.py: "yes" iff the answer holds the substring "yes" (lower-cased);
         the answer's first character is the label. VQA: Reefknot has no scorer, so the rule is ours: the label's
         words appear, in order, in the answer. Per task: accuracy and hallucination rate (1 - accuracy), overall and
         by relation_type (perception / cognition); their mean over the tasks (1 - it is Reefknot's R-score).
  align  (needs a teacher) see alignment.py: in the matched layers, 1 - the paper's VAT distance (all queries, the
         training default), 1 - the reference code's (image queries), and the text queries' similarity.
Every prompt goes through data.tokenize_conversation with a last human turn, so it ends exactly as in training.
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
import signal
import sys
import time
import warnings
from collections import OrderedDict, defaultdict

import torch
from PIL import Image
from tqdm import tqdm

from alignment import matched_layers, run_align, write_heatmaps
from checkpoint import checkpoint_kind, find_checkpoint
from common import pick_device, resolve_dtype, why
from data import IGNORE_INDEX, collate, decode_answer, json_lines, load_image, tokenize_conversation
from model import VLM

TASKS = ["vqa", "cr", "pope", "wino", "reefknot", "align"]
ANSWER_TASKS = ["vqa", "pope", "reefknot"]  # the tasks --predictions scores from answer files
REEFKNOT_FILES = {"yesno": "YESNO.jsonl", "multichoice": "Multichoice.jsonl", "vqa": "VQA.jsonl"}
CR_ORDER = ["swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel", "add_obj", "add_att"]
CAPTION_PROMPT = "describe the image ."  # = shapes.PROMPT, the LLaVA-pretrain style prompt of the captions
MCQ_PROMPT = "Which caption describes the image?\n(A) {a}\n(B) {b}\nAnswer with A or B."
# room for an answer that explains itself ("the red one is a square , so no"); mcq: for one that repeats a caption.
# Reefknot's own inference scripts allow longer answers (256 new tokens with ms-swift, 30 with MiniGPT-v2): its YESNO
# reading looks for "yes" anywhere, so a cap that cuts an answer short can change a verdict; 20 covers a short answer.
MAX_NEW_TOKENS = dict(vqa=20, pope=20, mcq=40, reefknot=20)
# VQAv2's answer normalisation (its evaluation's processPunctuation and processDigitArticle), rule for rule
NUMBER_WORDS = dict(none="0", **{w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine "
                                                                 "ten".split())})
ARTICLES = {"a", "an", "the"}
VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
    "I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't o'clock shan't should've shouldn't "
    "somebody's someone'd someone'll someone's something'd something'll that's there'd there're there's they'd "
    "they'll they're they've wasn't we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'll who's who've why'll why're why's won't would've wouldn't y'all you'd you'll you're you've").split()}
CONTRACTIONS.update({  # the forms with two apostrophes, as VQAv2's table spells them
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hed've": "he'd've", "he'dve": "he'd've", "Id've": "I'd've", "I'dve": "I'd've", "itd've": "it'd've",
    "it'dve": "it'd've", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "notve": "not've",
    "shed've": "she'd've", "she'dve": "she'd've", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "somethingd've": "something'd've", "something'dve": "something'd've",
    "thered've": "there'd've", "there'dve": "there'd've", "theyd've": "they'd've", "they'dve": "they'd've",
    "wed've": "we'd've", "we'dve": "we'd've", "whod've": "who'd've", "who'dve": "who'd've",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd've": "you'd've",
    "you'dve": "you'd've", "twas": "'twas", "somebody'd": "somebodyd"})


# -----------------------------------------------------------------------------
# metrics: pure functions on answers and scores; each benchmark is read as its own evaluation script reads it


def normalize_answer(text):
    """VQAv2's normalisation: each listed punctuation mark dropped (next to a space, or anywhere in a text with a
    digit,digit comma) or else made a space; a "." not before a digit dropped; then lower case, number words (none
    included) as digits, no articles, contractions with their apostrophe."""
    s = str(text).replace("\n", " ").replace("\t", " ").strip()
    out = s
    for p in VQA_PUNCT:
        out = out.replace(p, "" if p + " " in s or " " + p in s or re.search(r"\d,\d", s) else " ")
    words = [NUMBER_WORDS.get(w, w) for w in re.sub(r"\.(?!\d)", "", out).lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_score(prediction, answers):
    """VQAv2's accuracy against a list of answers: the mean, over the subsets that leave one answer out, of
    min(1, #matches / 3) (3 of 10 matching: 0.9). One answer (a string, or a list of one): normalised exact match
    (our rule: with one answer there is no annotator to leave out)."""
    p = normalize_answer(prediction)
    if isinstance(answers, str) or len(answers) == 1:
        return float(p == normalize_answer(answers if isinstance(answers, str) else answers[0]))
    hits = [normalize_answer(a) == p for a in answers]
    return sum(min(1.0, (sum(hits) - h) / 3.0) for h in hits) / len(hits)


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


def pope_reading(answer):
    """'yes' / 'no' as POPE's own evaluate.py reads an answer: the text before its first ".", commas dropped, split on
    single spaces; "no" iff one word is exactly "No", "not" or "no"; everything else is "yes" ("Not at all", "NO", "No!"
    included)."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def parse_yes_no(answer):
    """Our stricter reading of a yes/no answer, for the "invalid" column only: its first sentence, case-folded, says
    no when it holds the word "no" or "not", else yes when it holds "yes"; an answer with neither is None."""
    words = re.findall(r"[a-z]+", re.split(r"(?<!\d)\.(?!\d)", answer.lower(), maxsplit=1)[0])
    if "no" in words or "not" in words:
        return "no"
    return "yes" if "yes" in words else None


def invalid_rate(answers):
    """The share of answers that say neither yes nor no by our stricter reading (parse_yes_no)."""
    return _mean(parse_yes_no(a) is None for a in answers)


def pope_metrics(predictions, labels):
    """POPE's metrics from "yes" / "no" predictions, "yes" the positive class (a precision or recall with nothing to
    divide is 0)."""
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
                yes_ratio=sum(p == "yes" for p in predictions) / n)


def reefknot_says_yes(answer):
    """Reefknot's YESNO reading (its utils.py, calculate_yes_no_accuracy): "yes" iff 'yes' is a substring of the
    stripped, lower-cased answer ("No, the man's eyes are closed" holds it)."""
    return "yes" in answer.strip().lower()


def reefknot_correct(task, answer, label):
    """Is an answer right? yesno and multichoice as Reefknot's utils.py scores them: yesno, reefknot_says_yes against
    the label; multichoice, the answer's first character, upper-cased, equals the upper-cased label ("(B) onto" is not
    B). vqa: Reefknot has no scorer, so the rule is ours: the label's words occur in the answer's words, in order and
    next to each other."""
    if task == "yesno":
        return ("yes" if reefknot_says_yes(answer) else "no") == str(label).strip().lower()
    if task == "multichoice":
        return answer[:1].upper() == str(label).upper() != ""
    if task == "vqa":
        words, want = _words(answer).split(), _words(label).split()
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
            rep["yes_ratio"] = _mean(reefknot_says_yes(answers[i]) for i in idx)
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
# data: the test files, with image paths checked up front (or answers read from --predictions)


def _read_rows(path):
    """A JSON list/dict file or JSON lines (real POPE files are JSON lines named *.json)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json_lines(text, path)


def _field(row, key, path, line=None):
    """row[key], or an error that names the file and the item (a benchmark file of another layout)."""
    if not isinstance(row, dict) or key not in row:
        where = f"line {line}" if line else f"item {str(row)[:80]!r}"
        raise ValueError(f"{path}: {where} has no {key!r}; see evaluate.py's docstring for the layouts it reads")
    return row[key]


def _read_list(path):
    rows = _read_rows(path)
    return [rows] if isinstance(rows, dict) else rows  # a one-line JSON-lines file parses as one object


def _first_existing(*paths):
    return next((p for p in paths if p and os.path.exists(p)), None)


def image_folders(setting, default):
    """The folders a comma-separated --image_folder names, searched in order (Visual Genome's VG_100K,VG_100K_2)."""
    return [f.strip() for f in str(setting).split(",") if f.strip()] or [default]


def find_image(name, folders):
    """The path of image `name` in the first folder that has it; a name without an extension (Reefknot's image ids,
    Winoground's "ex_0_img_0") also as .jpg / .png / .jpeg. Not found: its path under the first folder."""
    name = str(name)
    tries = [name] + ([] if os.path.splitext(name)[1] else [name + e for e in (".jpg", ".png", ".jpeg")])
    for folder in folders:
        for t in tries:
            if os.path.isfile(os.path.join(folder, t)):
                return os.path.abspath(os.path.join(folder, t))
    return os.path.abspath(os.path.join(folders[0], tries[min(1, len(tries) - 1)]))


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
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # not an image, a damaged
                # one, or one over PIL's pixel limit (its error is no OSError)
                cache[path] = why(e)
    return cache[path]


def _keep_with_images(items, keys, folders, task):
    """Each item's image names (`keys`) resolved to files in `folders`; items whose images are missing or are not
    images dropped and counted: a few bad rows must not stop a long run; none left is an error. folders None: answers
    come from --predictions, no image is read."""
    if folders is None:
        return items, 0
    folders = image_folders(folders, ".") if isinstance(folders, str) else folders
    kept, missing, unreadable, cache = [], [], [], {}
    for it in items:
        it = dict(it, **{k: find_image(it[k], folders) for k in keys})
        bad = [(p, why) for p in (it[k] for k in keys) if (why := _image_problem(p, cache))]
        if not bad:
            kept.append(it)
        elif bad[0][1] == "missing":
            missing.append(bad[0][0])
        else:
            unreadable.append(bad[0])
    where = ",".join(folders)
    if (missing or unreadable) and not kept:
        if not unreadable:
            raise FileNotFoundError(f"{task}: none of the {len(missing)} items' images exist (e.g. {missing[0]}); "
                                    f"set --image_folder to the folder(s) the test file's image names are in "
                                    f"(several: comma-separated, searched in order; now {where})")
        raise ValueError(f"{task}: none of the {len(missing) + len(unreadable)} items' images can be read "
                         f"({len(unreadable)} not images, e.g. {unreadable[0][0]} ({unreadable[0][1]}); "
                         f"{len(missing)} missing); check the test file's images and --image_folder (now {where})")
    if missing:
        warnings.warn(f"{task}: skipping {len(missing)} items whose images are missing from {where} "
                      f"(e.g. {missing[0]})")
    if unreadable:
        warnings.warn(f"{task}: skipping {len(unreadable)} items whose images cannot be read (e.g. "
                      f"{unreadable[0][0]}: {unreadable[0][1]})")
    return kept, len(missing) + len(unreadable)


def read_predictions(bench_path, rows, pred_dir):
    """The answers to `rows` (the benchmark file's items, in order) from the file of the same name in pred_dir: one
    JSON object a line, {"text": answer} (or "answer") plus "question_id" where the benchmark has one (LLaVA's answer
    files). Matched by question_id when both sides have it, else by position."""
    path = os.path.join(pred_dir, os.path.basename(bench_path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no answer file for {bench_path}; --predictions needs a file of the same name "
                                "for every benchmark file it scores (or leave the task out of --tasks)")
    lines = _read_list(path)
    texts = []
    for k, a in enumerate(lines, 1):
        if not isinstance(a, dict) or not isinstance(a.get("text", a.get("answer")), str):
            raise ValueError(f"{path}: line {k} has no \"text\" (the answer as a string); answer files hold one "
                             "{\"text\": ..., \"question_id\": ...} a line")
        texts.append(a.get("text", a.get("answer")))
    if len(lines) != len(rows):
        raise ValueError(f"{path}: {len(lines)} answers for the {len(rows)} items of {bench_path}; give one answer "
                         "per item")
    if all("question_id" in r for r in rows) and all("question_id" in a for a in lines):
        by_id = {str(a["question_id"]): t for a, t in zip(lines, texts)}
        ids = [str(r["question_id"]) for r in rows]
        extra, unanswered = sorted(set(by_id) - set(ids)), sorted(set(ids) - set(by_id))
        if extra or unanswered:
            raise ValueError(f"{path}: " + (f"question_id {extra[0]!r} is not a question of {bench_path}" if extra else
                                            f"question_id {unanswered[0]!r} of {bench_path} has no answer") +
                             f" ({len(extra)} unknown, {len(unanswered)} unanswered); answer each question once")
        return [by_id[i] for i in ids]
    return texts


def _with_answers(items, path, rows, pred_dir):
    """items (parsed from the benchmark file's `rows`) with their "prediction" from pred_dir, when given."""
    if not pred_dir:
        return items
    return [dict(it, prediction=t) for it, t in zip(items, read_predictions(path, rows, pred_dir))]


def load_vqa(path, folders, limit=None, predictions=""):
    items = []
    rows = _read_list(path)
    for k, r in enumerate(rows, 1):
        answers = r.get("answers", r.get("answer")) if isinstance(r, dict) else None
        if answers is None:
            raise ValueError(f"{path}: line {k} has no 'answer' / 'answers' (a test-dev file without answers is "
                             "scored by the benchmark's own server)")
        if isinstance(answers, list):
            answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
        question = r.get("question", r.get("text"))
        if question is None:
            raise ValueError(f"{path}: line {k} has no 'question' / 'text'")
        items.append(dict(question=question, answers=answers, image=_field(r, "image", path, k),
                          type=r.get("type", r.get("question_type", r.get("category"))),
                          yes_no=r.get("answer_type") == "yes/no"))
    items = _with_answers(items, path, rows, predictions)
    return _keep_with_images(items[:limit or None], ["image"], folders, f"vqa ({path})")


def cr_subsets(cr_dir):
    names = [f[:-5] for f in os.listdir(cr_dir) if f.endswith(".json")]
    return [s for s in CR_ORDER if s in names] + sorted(s for s in names if s not in CR_ORDER)


def load_cr(cr_dir, folders, limit=None):
    items, skipped = [], 0
    for subset in cr_subsets(cr_dir):
        rows = _read_rows(os.path.join(cr_dir, subset + ".json"))
        rows = list(rows.values()) if isinstance(rows, dict) else rows
        where = os.path.join(cr_dir, subset + ".json")
        sub = [dict(subset=subset, image=_field(r, "filename", where), pos=_field(r, "caption", where),
                    neg=_field(r, "negative_caption", where)) for r in rows[:limit or None]]
        sub, k = _keep_with_images(sub, ["image"], folders, f"cr/{subset}")
        items += sub
        skipped += k
    return items, skipped


def load_pope(files, folders, limit=None, predictions=""):
    """POPE files (POPE's own layout: question_id, image, text, label; or question / answer), one split per category
    (default: the file name after "pope_"). A label other than yes / no is an error naming the file and line."""
    items, skipped = [], 0
    for path in files:
        default_split = re.sub(r"^.*pope_", "", os.path.basename(path)).split(".")[0]
        rows, parsed = _read_list(path), []
        for k, r in enumerate(rows, 1):
            label = r.get("label", r.get("answer")) if isinstance(r, dict) else None
            if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
                raise ValueError(f"{path}: line {k} has {'label ' + repr(label) if label is not None else 'no label'}; "
                                 "POPE items need \"label\" (or \"answer\"): \"yes\" or \"no\"")
            question = r.get("text", r.get("question"))
            if question is None:
                raise ValueError(f"{path}: line {k} has no 'text' / 'question'")
            parsed.append(dict(question=question, label=label.strip().lower(), image=_field(r, "image", path, k),
                               split=r.get("category", default_split)))
        parsed = _with_answers(parsed, path, rows, predictions)
        by_split = defaultdict(list)
        for it in parsed:
            by_split[it["split"]].append(it)
        for split, sub in by_split.items():
            sub, k = _keep_with_images(sub[:limit or None], ["image"], folders, f"pope/{split}")
            items += sub
            skipped += k
    return items, skipped


def load_wino(path, folders, limit=None):
    items = []
    for r in _read_list(path)[:limit or None]:
        if "image_0" in r:
            items.append(dict(images=[r["image_0"], r["image_1"]], captions=[r["caption_0"], r["caption_1"]]))
        else:
            items.append(dict(images=[r["image"], r["negative_image"]], captions=[r["caption"], r["negative_caption"]]))
    for it in items:
        it["image_0"], it["image_1"] = it["images"]
    items, skipped = _keep_with_images(items, ["image_0", "image_1"], folders, f"wino ({path})")
    for it in items:
        it["images"] = [it["image_0"], it["image_1"]]
    return items, skipped


def load_reefknot(reefknot_dir, folders, limit=None, predictions=""):
    """Items of the Reefknot files present in reefknot_dir (at least one of REEFKNOT_FILES); an item's image is
    <image_id>.jpg (or .png) in the first of `folders` that has it, as Reefknot's own loader searches VG's two."""
    found = {t: os.path.join(reefknot_dir, f) for t, f in REEFKNOT_FILES.items()
             if os.path.isfile(os.path.join(reefknot_dir, f))}
    if not found:
        raise FileNotFoundError(f"reefknot: none of {list(REEFKNOT_FILES.values())} in {reefknot_dir}; point "
                                "--reefknot_dir at the folder of the Reefknot download (or generate the shapes world)")
    items, skipped = [], 0
    for task, path in found.items():
        rows = []
        raw = _read_list(path)
        for k, r in enumerate(raw, 1):
            missing = [f for f in ("image_id", "query_prompt", "label") if f not in r]
            if missing:
                raise ValueError(f"{path}: line {k} has no {missing}; Reefknot items hold image_id, query_prompt, "
                                 "label (and relation_type)")
            rows.append(dict(task=task, image=str(r["image_id"]), query=r["query_prompt"],
                             label=str(r["label"]), relation_type=r.get("relation_type") or "unspecified"))
        rows = _with_answers(rows, path, raw, predictions)
        rows, k = _keep_with_images(rows[:limit or None], ["image"], folders, f"reefknot/{REEFKNOT_FILES[task]}")
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
# tasks; each report says which reading made its numbers ("reading")

READINGS = dict(
    vqa="VQAv2's evaluation: normalised answers, mean over the leave-one-out annotator subsets of min(1, matches/3); "
        "one answer: normalised exact match",
    vqa_verdict="ours: a yes/no question (answer_type yes/no) scored on the verdict its answer states (parse_yes_no)",
    pope="POPE's evaluate.py: first sentence, commas dropped, 'no' iff a word is No / not / no, else 'yes'",
    pope_invalid="ours: answers that say neither yes nor no (parse_yes_no)",
    pope_forced="ours: 'yes' vs 'no' log-probability at the first answer token",
    reefknot="Reefknot's utils.py: YESNO 'yes' iff the answer holds the substring yes; Multichoice: the answer's "
             "first character is the label; VQA (Reefknot has no scorer): ours, the label's words in order in the "
             "answer")


def answers(r, items, specs, max_new_tokens, desc):
    """The items' answers: from --predictions when they carry them, else generated by the model."""
    if items and all("prediction" in it for it in items):
        return [it["prediction"] for it in items]
    return r.generate(specs, max_new_tokens, desc)


def run_vqa(r, items, answer_suffix="", max_new_tokens=MAX_NEW_TOKENS["vqa"]):
    preds = answers(r, items, [(it["question"] + answer_suffix, it["image"], None) for it in items], max_new_tokens,
                    "vqa")
    scores = [vqa_score(p, it["answers"]) for p, it in zip(preds, items)]

    def by_type(scores):
        per_type = defaultdict(list)
        for s, it in zip(scores, items):
            if it.get("type"):
                per_type[it["type"]].append(s)
        return {k: _mean(v) for k, v in sorted(per_type.items())}
    rep = dict(reading=READINGS["vqa"], n=len(items), accuracy=_mean(scores), per_type=by_type(scores),
               examples=[dict(question=it["question"], answer=it["answers"], prediction=p, score=s)
                         for it, p, s in list(zip(items, preds, scores))[:8]])
    if any(it.get("yes_no") for it in items):  # the shapes files' yes/no kinds; an extra figure, never the headline
        verdict = [vqa_score(parse_yes_no(p) or "", it["answers"]) if it.get("yes_no") else s
                   for p, it, s in zip(preds, items, scores)]
        rep["verdict"] = dict(reading=READINGS["vqa_verdict"], accuracy=_mean(verdict), per_type=by_type(verdict))
    return rep


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
    """generate: the answers read as POPE reads them (with our invalid rate beside); forced (a model only): "yes" vs
    "no" at the first answer token."""
    specs = [(it["question"] + answer_suffix, it["image"], None) for it in items]
    said = answers(r, items, specs, MAX_NEW_TOKENS["pope"], "pope generate")
    readings = [("generate", [pope_reading(a) for a in said])]
    if r is not None:
        lp = r.first_token_logprobs(specs, ["yes", "no"], "pope forced")
        readings.append(("forced", ["yes" if y > n else "no" for y, n in lp]))
    splits = list(dict.fromkeys(it["split"] for it in items))
    report = {}
    for name, preds in readings:
        per = {s: pope_metrics([p for p, it in zip(preds, items) if it["split"] == s],
                               [it["label"] for it in items if it["split"] == s]) for s in splits}
        if name == "generate":
            for s in splits:
                per[s]["invalid"] = invalid_rate(a for a, it in zip(said, items) if it["split"] == s)
        keys = [k for k in per[splits[0]] if k != "n"]
        report[name] = dict(reading=READINGS["pope" if name == "generate" else "pope_forced"], per_split=per,
                            avg={k: _mean(v[k] for v in per.values()) for k in keys})
        report[name]["avg"]["n"] = len(items)
    report["generate"]["invalid_reading"] = READINGS["pope_invalid"]
    report["examples"] = [dict(question=it["question"], label=it["label"], answer=a)
                          for it, a in list(zip(items, said))[:8]]
    return report


def run_reefknot(r, items, answer_suffix=""):
    said = answers(r, items, [(it["query"] + answer_suffix, it["image"], None) for it in items],
                   MAX_NEW_TOKENS["reefknot"], "reefknot")
    correct = [reefknot_correct(it["task"], a, it["label"]) for it, a in zip(items, said)]
    rep = reefknot_metrics(correct, [it["task"] for it in items], [it["relation_type"] for it in items], said)
    rep["reading"] = READINGS["reefknot"]
    rep["examples"] = [dict(task=it["task"], query=it["query"], label=it["label"], answer=a, correct=ok)
                       for it, a, ok in list(zip(items, said, correct))[:8]]
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
    report.md and the heat maps there (rewritten after each task: an interrupted run leaves the tasks it finished,
    marked "status": "interrupted"). `model` / `teacher`: a VLM or a checkpoint directory; model None with
    predictions=DIR scores the answer files in DIR instead (vqa, pope, reefknot). `settings`: the evaluation settings
    of DEFAULTS (tasks, limit, heatmaps, prompts, files...). "align" needs a teacher and is skipped (with a note)
    without one.
    """
    unknown = sorted(set(settings) - set(DEFAULTS) | set(settings) & CLI_ONLY)
    if unknown:
        raise ValueError(f"unknown evaluation settings {unknown}: use those of evaluate.DEFAULTS")
    o = {k: v for k, v in dict(DEFAULTS, **settings).items() if k not in CLI_ONLY}
    tasks, limit, batch_size, heatmaps = o["tasks"], o["limit"] or None, o["batch_size"], o["heatmaps"]
    answer_suffix, caption_prompt, pred_dir = o["answer_suffix"], o["caption_prompt"], o["predictions"]
    data_dir = data
    t_start = time.time()
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    protocols = [p.strip() for p in o["cr_protocol"].split(",")] if isinstance(o["cr_protocol"], str) else list(o["cr_protocol"])
    bad = [t for t in tasks if t not in TASKS] + [p for p in protocols if p not in ("mcq", "likelihood")]
    if bad:
        raise ValueError(f"unknown task / CR protocol {bad}: tasks are {TASKS}, protocols mcq and likelihood")
    if heatmaps and not out:
        raise ValueError("heatmaps need an output directory (out=...)")
    notes = []
    if pred_dir:
        if not os.path.isdir(pred_dir):
            raise FileNotFoundError(f"--predictions={pred_dir}: no such folder; give the folder of answer files")
        if model is not None or heatmaps:
            raise ValueError("--predictions scores answer files without a model: leave out the model and --heatmaps")
        dropped = [t for t in tasks if t not in ANSWER_TASKS]
        tasks = [t for t in tasks if t in ANSWER_TASKS]
        if dropped:
            notes.append(f"{', '.join(dropped)} not scored: --predictions scores {', '.join(ANSWER_TASKS)} only")
        if not tasks:
            raise ValueError(f"--predictions: none of --tasks is one of {ANSWER_TASKS}")
        r, model_path, teacher = None, None, None
    else:
        if model is None:
            raise ValueError("no model to evaluate: give a VLM or a checkpoint directory (or predictions=<answers dir>)")
        model, model_path = _load(model)
        if model_path and torch.cuda.is_available():  # loaded here: use the GPU (a passed-in model stays put)
            model.cuda()
        model.eval()
    teacher, teacher_path = _load(teacher) if teacher is not None else (None, None)
    if teacher is not None:
        teacher.eval()
        teacher.to(next(model.parameters()).device)
    folders = None if pred_dir else image_folders(o["image_folder"], data_dir)
    if not pred_dir:
        r = Runner(model, folders[0], batch_size, progress)
    files = find_files(data_dir, o["vqa_file"], o["cr_dir"], o["pope_dir"], o["wino_file"], o["reefknot_dir"])
    report = dict(model=name or model_path or (f"answers in {pred_dir}" if pred_dir else type(model).__name__),
                  teacher=teacher_name or teacher_path, data=data_dir, predictions=pred_dir or None,
                  image_folder=o["image_folder"] or data_dir, tasks=tasks, limit=limit,
                  device=str(r.device) if r else "none", status="running", notes=notes, skipped={}, seconds={})

    def need(task, key):
        if not files[key]:
            raise FileNotFoundError(f"task {task}: no test file under {data_dir} (looked for test/{key}...); "
                                    f"generate the shapes world (python shapes.py), pass its path, or leave the task "
                                    f"out of --tasks")
        return files[key]

    for task in tasks:  # every test file is found before the first task runs, not after an hour of the others
        if task != "align":
            need(task, task)
    # Reefknot names images by id; the shapes world keeps them in <data>/images
    shapes_images = os.path.join(data_dir, "images")
    rk_folders = None if pred_dir else image_folders(o["reefknot_image_folder"] or o["image_folder"],
                                                     shapes_images if os.path.isdir(shapes_images) else data_dir)
    cache = {}

    def load(task):
        if task not in cache:
            if task == "vqa":
                cache[task] = load_vqa(need("vqa", "vqa"), folders, limit, pred_dir)
            elif task == "cr":
                cache[task] = load_cr(need("cr", "cr"), folders, limit)
            elif task == "pope":
                cache[task] = load_pope(need("pope", "pope"), folders, limit, pred_dir)
            elif task == "wino":
                cache[task] = load_wino(need("wino", "wino"), folders, limit)
            elif task == "reefknot":
                cache[task] = load_reefknot(need("reefknot", "reefknot"), rk_folders, limit, pred_dir)
            report["skipped"][task] = cache[task][1]
        return cache[task][0]

    if pred_dir:  # every answer file read and matched before anything is written
        for task in tasks:
            load(task)
    if "align" in tasks and teacher is None:
        tasks.remove("align")
        report["notes"].append("align skipped: it needs a teacher (--teacher)")
    pairs = None
    if "align" in tasks or heatmaps:
        pairs = matched_layers(model, teacher, o["student_layers"], o["teacher_layers"], o["matching"] or None)
        report["matched_layers"] = dict(student=pairs.student, teacher_windows=pairs.windows)

    def save():
        if out:
            os.makedirs(out, exist_ok=True)
            for fname, text in (("report.json", json.dumps(report, indent=1)), ("report.md", report_markdown(report))):
                with open(os.path.join(out, fname + ".tmp"), "w") as f:
                    f.write(text)
                os.replace(os.path.join(out, fname + ".tmp"), os.path.join(out, fname))

    save()  # an older report in `out` is replaced now, not at the end: what is there is always this run's
    try:
        for task in tasks:
            t0 = time.time()
            if task == "vqa":
                report["vqa"] = run_vqa(r, load("vqa"), answer_suffix)
            elif task == "cr":
                report["cr"] = run_cr(r, load("cr"), protocols, o["mcq_prompt"], caption_prompt)
            elif task == "pope":
                report["pope"] = run_pope(r, load("pope"), answer_suffix)
            elif task == "wino":
                report["wino"] = run_wino(r, load("wino"), caption_prompt)
            elif task == "reefknot":
                report["reefknot"] = run_reefknot(r, load("reefknot"))
            elif task == "align":
                report["align"] = {}
                if files["vqa"]:
                    report["align"]["vqa"] = run_align(r, teacher, pairs, [(it["question"] + answer_suffix, it["image"],
                                                                            None) for it in load("vqa")], "align vqa")
                if files["cr"]:
                    report["align"]["cr"] = run_align(r, teacher, pairs, [(caption_prompt, it["image"], it["pos"])
                                                                          for it in load("cr")], "align cr")
            report["seconds"][task] = round(time.time() - t0, 2)
            save()

        if heatmaps:
            os.makedirs(out, exist_ok=True)
            specs, titles = [], []
            vqa = load("vqa")[:(heatmaps + 1) // 2] if files["vqa"] else []
            cr = load("cr")[:heatmaps - len(vqa)] if files["cr"] else []
            for it in vqa:
                specs.append((it["question"] + answer_suffix, it["image"], None))
                titles.append(f"VQA: {it['question']}  (answer: {it['answers']})")
            for it in cr:
                specs.append((caption_prompt, it["image"], it["pos"]))
                titles.append(f"CR {it['subset']}: {it['pos']}")
            t0 = time.time()
            report["heatmaps"] = write_heatmaps(r, teacher, pairs, specs, titles, out)
            report["seconds"]["heatmaps"] = round(time.time() - t0, 2)
    except BaseException as e:  # Ctrl-C, SIGTERM (main) or a crash: keep what finished, say that the run did not
        report["status"] = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else \
            f"failed ({type(e).__name__})"
        save()
        raise
    report["seconds"]["total"] = round(time.time() - t_start, 2)
    report["status"] = "complete"
    save()
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


def task_n(rep, task):
    """The number of items a task's figures were computed on (None when the report lacks the task)."""
    t = rep.get(task) if isinstance(rep, dict) else None
    if not isinstance(t, dict):
        return None
    if task == "cr":
        per = _get(t, "likelihood", "per_subset") or _get(t, "mcq", "per_subset") or {}
        return sum(v["n"] for v in per.values())
    if task == "pope":
        return sum(v["n"] for v in (_get(t, "generate", "per_split") or {}).values())
    if task == "reefknot":
        return sum(t[k]["n"] for k in REEFKNOT_FILES if k in t)
    return t.get("n")


def counts(rep):
    """"vqa 200, pope 597 (3 skipped), ...": the items behind each task's figures and those the run skipped."""
    cells = []
    for task in ("vqa", "cr", "pope", "wino", "reefknot"):
        n = task_n(rep, task)
        if n is not None:
            k = rep.get("skipped", {}).get(task, 0)
            cells.append(f"{task} {n}" + (f" ({k} skipped)" if k else ""))
    return ", ".join(cells) or "-"


def compare_table(reports):
    """Markdown: one row per model (name -> report); numbers in %. CR subset cells are "MCQ / likelihood"; the n column
    counts each task's items and the skipped ones (a missing or unreadable image)."""
    subsets = list(dict.fromkeys(s for rep in reports.values() for s in (_get(rep, "cr", "subsets") or [])))
    head = (["model", "n (skipped)", "VQA", "CR mcq", "CR lik"] + [f"{s} (mcq/lik)" for s in subsets] +
            ["POPE F1 (gen/forced)", "Wino group", "Reefknot halluc. (yes-no / mc / vqa / mean)",
             "align VQA (all / img / text q)", "align CR (all / img / text q)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rep in reports.items():
        row = [name, counts(rep), _pct(_get(rep, "vqa", "accuracy")), _pct(_get(rep, "cr", "mcq", "avg")),
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
          f"limit: {rep['limit']}; device: {rep['device']}", ""]
    if rep.get("status", "complete") != "complete":
        done = [t for t in rep["tasks"] if t in rep]
        md += [f"**Status: {rep['status']}** (finished: {', '.join(done) or 'none'}; not finished: "
               f"{', '.join(t for t in rep['tasks'] if t not in done) or 'none'})", ""]
    md.append(compare_table({name: rep}))
    for note in rep.get("notes", []):
        md.append(f"Note: {note}\n")
    skipped = lambda task: f" ({rep['skipped'][task]} skipped)" if rep.get("skipped", {}).get(task) else ""
    if "vqa" in rep:
        v = rep["vqa"]
        md += ["## VQA", "", f"accuracy {_pct(v['accuracy'])} on {v['n']} items{skipped('vqa')}; reading: "
               f"{v['reading']}", ""]
        verdict = v.get("verdict", {})
        if verdict:
            md += [f"verdict accuracy {_pct(verdict['accuracy'])} (reading: {verdict['reading']})", ""]
        if v["per_type"]:
            md += ["| type | accuracy | verdict accuracy |", "|---|---|---|"] + \
                  [f"| {k} | {_pct(a)} | {_pct(_get(verdict, 'per_type', k))} |" for k, a in v["per_type"].items()] + [""]
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
        md.append(f"\nn: items per subset{skipped('cr')}; readings ours: MCQ answers by parse_choice, likelihood "
                  "by length-normalised log P(caption)")
        if _get(c, "mcq", "unknown_words"):
            md.append(f"\nMCQ prompt words unknown to the tokenizer (<unk>): {' '.join(c['mcq']['unknown_words'])}")
        md.append("")
    if "pope" in rep:
        md += ["## POPE", "", "| split | protocol | n | accuracy | precision | recall | F1 | yes-ratio | invalid (ours) |",
               "|---|---|---|---|---|---|---|---|---|"]
        for proto in ("generate", "forced"):
            p = rep["pope"].get(proto)
            for s, m in (list(p["per_split"].items()) + [("**mean**", p["avg"])]) if p else []:
                md.append(f"| {s} | {proto} | {m['n']} | " + " | ".join(_pct(m.get(k)) for k in
                          ("accuracy", "precision", "recall", "f1", "yes_ratio", "invalid")) + " |")
        md += ["", f"readings: generate, {rep['pope']['generate']['reading']}; invalid, "
               f"{rep['pope']['generate']['invalid_reading']}" +
               (f"; forced, {rep['pope']['forced']['reading']}" if "forced" in rep["pope"] else "") +
               f". Mean n: all splits' items{skipped('pope')}.", ""]
    if "wino" in rep:
        w = rep["wino"]
        md += ["## Winoground-style", "", f"text {_pct(w['text'])}, image {_pct(w['image'])}, "
               f"group {_pct(w['group'])} on {w['n']} items{skipped('wino')}", ""]
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
        md.append(f"\nreading: {rk['reading']}{'; ' + skipped('reefknot').strip(' ()') if skipped('reefknot') else ''}")
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
    out="",                   # where the report goes (default: <model>_eval, beside the checkpoint, not inside it)
    dtype="auto",             # the models load and compute in it (no autocast): auto = bfloat16 on CUDA, float32
                              # on CPU; or float32 / bfloat16
    tasks="vqa,cr,pope,reefknot,align",  # any of vqa, cr, pope, wino, reefknot, align
    limit=0,                  # >0: items per VQA file / CR subset / POPE split / Winoground file / Reefknot file
    batch_size=16,            # prompts per forward
    heatmaps=0,               # number of attention heat-map PNGs (half VQA, half CR items)
    cr_protocol="mcq,likelihood",  # CR protocols: mcq and / or likelihood
    image_folder="",          # the folder(s) the files' image paths are relative to, comma-separated, searched in
                              # order (default: data)
    predictions="",           # instead of a model: a folder of answer files named as the benchmark files (vqa.jsonl,
                              # coco_pope_random.json, YESNO.jsonl...), one {"text", "question_id"} a line
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
    reefknot_image_folder="", # where Reefknot's <image_id>.jpg are, when not image_folder (e.g. COCO for POPE): Visual
                              # Genome's two folders, comma-separated (VG_100K,VG_100K_2); shapes: <data>/images
)
CLI_ONLY = {"model", "compare", "teacher", "data", "out", "dtype"}  # the rest are evaluate()'s settings


def default_out(cfg):
    """Where the report goes without --out: beside the checkpoint (<model>_eval), never inside it, where the next
    save of a resumed run would replace it; for --predictions, <predictions>_eval."""
    return os.path.normpath(cfg["model"] or cfg["predictions"]) + "_eval"


def compare_runs(spec):
    """[(name, checkpoint dir)] from --compare="name=dir,...", every directory checked before the first model runs."""
    runs = [tuple(x.strip().split("=", 1)) for x in spec.split(",")]
    if any(len(r) != 2 or not r[0] or not r[1] for r in runs):
        raise ValueError(f"--compare={spec!r}: write name=dir pairs separated by commas")
    names = [n for n, _ in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--compare: the name {dup[0]!r} is given twice; give each model its own name")
    for _, path in runs:  # a typo in the last path must not cost the evaluation of the first
        checkpoint_kind(find_checkpoint(path) or path)
    return runs


def main(argv=None):
    """One model (--model, report in --out or <model>_eval), several (--compare="name=dir,...": each into
    <out>/<name>, plus one comparison table in <out>/report.md), or a folder of answers (--predictions). Returns the
    report(s)."""
    from configurator import configure
    cfg = configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv, __doc__, [__file__])
    if argv is None:  # the command line: SIGTERM stops the run as Ctrl-C does, so the report says it was interrupted
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if sum(bool(cfg[k]) for k in ("model", "compare", "predictions")) != 1:
        raise ValueError("give one of --model=<checkpoint dir>, --compare=name=dir,name=dir with --out=<dir>, or "
                         "--predictions=<folder of answer files>")
    if cfg["compare"] and not cfg["out"]:
        raise ValueError("--compare needs --out=<dir> for the comparison table")
    opts = {k: v for k, v in cfg.items() if k not in CLI_ONLY}
    if cfg["predictions"]:
        out = cfg["out"] or default_out(cfg)
        rep = evaluate(None, cfg["data"], out=out, **opts)
        print(report_markdown(rep))
        print(f"-> {out}/report.json, report.md")
        return rep
    runs = compare_runs(cfg["compare"]) if cfg["compare"] else [(None, cfg["model"])]
    device = pick_device()
    dtype = resolve_dtype(cfg["dtype"], device)
    teacher, teacher_path = _load(cfg["teacher"], dtype) if cfg["teacher"] else (None, None)
    if teacher is not None:
        teacher.to(device)
    reports = {}

    def write_table(status):
        table = compare_table(reports)
        os.makedirs(cfg["out"], exist_ok=True)
        with open(os.path.join(cfg["out"], "report.json"), "w") as f:
            json.dump(reports, f, indent=1)
        with open(os.path.join(cfg["out"], "report.md"), "w") as f:
            f.write(f"# Comparison on {cfg['data']}\n\n" +
                    (f"**Status: {status}** ({len(reports)} of {len(runs)} models)\n\n" if status else "") +
                    f"{table}\n" + "".join(f"- [{n}]({n}/report.md): {r['model']}\n" for n, r in reports.items()))
        return table

    if cfg["compare"]:
        write_table("running")  # an older table in --out is replaced now, not when the last model is done
    for name, path in runs:
        model, path = _load(path, dtype)
        # the teacher compared with itself says nothing: evaluate it alone (its heat maps show its own attention)
        own = teacher is not None and os.path.realpath(path) == os.path.realpath(teacher_path)
        out = os.path.join(cfg["out"], name) if name else cfg["out"] or default_out(cfg)
        try:
            rep = evaluate(model.to(device), cfg["data"], teacher=None if own else teacher, out=out, name=path,
                           teacher_name=None if own else cfg["teacher"] or None, **opts)
        except BaseException:
            if cfg["compare"]:
                write_table("interrupted")
            raise
        print(report_markdown(rep))
        print(f"-> {out}/report.json, report.md")
        reports[name or path] = rep
        if cfg["compare"]:
            write_table("running" if len(reports) < len(runs) else "")
        del model
    if not cfg["compare"]:
        return next(iter(reports.values()))
    print(compare_table(reports))
    print(f"-> {cfg['out']}/report.md")
    return reports


if __name__ == "__main__":
    from configurator import cli
    cli(main)
