"""
VQA (VQAv2-style): a greedy short answer per question, scored by VQAv2's evaluation (its vqaEval.py) rule for rule.

File: vqa.jsonl, one {"question" | "text", "answer" (str) | "answers" (list of str or {"answer"}), "image"} a line,
optional "question_id", "answer_type" ("yes/no" also gets the verdict figure). A line without an answer is an error.
Reading: punctuation, articles, number words (none -> 0) and contractions normalised; accuracy = the mean over the
leave-one-out subsets of the annotators' answers of min(1, #matches / 3) (3 of 10: 0.9). One answer: normalised exact
match (ours). Extra figure, ours: "verdict", a yes/no question scored on the verdict its answer states
(parse_yes_no), for answers that explain themselves.
"""
import re
from collections import defaultdict

from tasks.common import answers_for, field, get, keep_with_images, mean, parse_yes_no, pct, read_list, with_answers

# room for an answer that explains itself ("the red one is a square , so no")
MAX_NEW_TOKENS = 20
READING = ("VQAv2's evaluation: normalised answers, mean over the leave-one-out annotator subsets of min(1, "
           "matches/3); one answer: normalised exact match")
VERDICT_READING = "ours: a yes/no question (answer_type yes/no) scored on the verdict its answer states (parse_yes_no)"
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


def load(path, folders, limit=None, predictions=""):
    """(items, skipped) of a VQA file, with their answers from the file of the same name in `predictions`."""
    items = []
    rows = read_list(path)
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
        items.append(dict(question=question, answers=answers, image=field(r, "image", path, k),
                          type=r.get("type", r.get("question_type", r.get("category"))),
                          yes_no=r.get("answer_type") == "yes/no"))
    items = with_answers(items, path, rows, predictions)
    return keep_with_images(items[:limit or None], ["image"], folders, f"vqa ({path})")


def run(r, items, answer_suffix="", max_new_tokens=MAX_NEW_TOKENS):
    """The VQA report: VQAv2's accuracy overall and per question type, and the verdict figure for yes/no items."""
    preds = answers_for(r, items, [(it["question"] + answer_suffix, it["image"], None) for it in items], max_new_tokens,
                    "vqa")
    scores = [vqa_score(p, it["answers"]) for p, it in zip(preds, items)]

    def by_type(scores):
        per_type = defaultdict(list)
        for s, it in zip(scores, items):
            if it.get("type"):
                per_type[it["type"]].append(s)
        return {k: mean(v) for k, v in sorted(per_type.items())}
    rep = dict(reading=READING, n=len(items), accuracy=mean(scores), per_type=by_type(scores),
               examples=[dict(question=it["question"], answer=it["answers"], prediction=p, score=s)
                         for it, p, s in list(zip(items, preds, scores))[:8]])
    if any(it.get("yes_no") for it in items):  # the shapes files' yes/no kinds; an extra figure, never the headline
        verdict = [vqa_score(parse_yes_no(p) or "", it["answers"]) if it.get("yes_no") else s
                   for p, it, s in zip(preds, items, scores)]
        rep["verdict"] = dict(reading=VERDICT_READING, accuracy=mean(verdict), per_type=by_type(verdict))
    return rep


def markdown(v, skipped=""):
    """The report's VQA section, as markdown lines; skipped: " (k skipped)" or ""."""
    md = ["## VQA", "", f"accuracy {pct(v['accuracy'])} on {v['n']} items{skipped}; reading: "
          f"{v['reading']}", ""]
    verdict = v.get("verdict", {})
    if verdict:
        md += [f"verdict accuracy {pct(verdict['accuracy'])} (reading: {verdict['reading']})", ""]
    if v["per_type"]:
        md += ["| type | accuracy | verdict accuracy |", "|---|---|---|"] + \
              [f"| {k} | {pct(a)} | {pct(get(verdict, 'per_type', k))} |" for k, a in v["per_type"].items()] + [""]
    return md
