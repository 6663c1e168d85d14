"""
Reefknot (relation hallucination): greedy answers to each query_prompt, read as Reefknot's utils.py reads them.

Files: Reefknot's layout, YESNO.jsonl, Multichoice.jsonl, VQA.jsonl (any of them), one {"image_id", "query_prompt",
"label", "relation_type"} a line; the image is <image_id>.jpg (or .png) in the first of the image folders that has it
(Visual Genome's two folders, VG_100K,VG_100K_2, as Reefknot's own loader searches them).
YESNO and Multichoice as Reefknot's utils.py: "yes" iff the answer holds the substring "yes" (lower-cased); the
answer's first character is the label. VQA: Reefknot has no scorer, so the rule is ours: the label's words appear, in
order, in the answer. Per task: accuracy and hallucination rate (1 - accuracy), overall and by relation_type
(perception / cognition); their mean over the tasks (1 - it is Reefknot's R-score).
"""
import os

from tasks.common import answers_for, get, keep_with_images, mean, pct, plain_words, read_list, with_answers

REEFKNOT_FILES = {"yesno": "YESNO.jsonl", "multichoice": "Multichoice.jsonl", "vqa": "VQA.jsonl"}
# Reefknot's own inference scripts allow longer answers (256 new tokens with ms-swift, 30 with MiniGPT-v2): its YESNO
# reading looks for "yes" anywhere, so a cap that cuts an answer short can change a verdict; 20 covers a short answer.
MAX_NEW_TOKENS = 20
READING = ("Reefknot's utils.py: YESNO 'yes' iff the answer holds the substring yes; Multichoice: the answer's first "
           "character is the label; VQA (Reefknot has no scorer): ours, the label's words in order in the answer")


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
        words, want = plain_words(answer).split(), plain_words(label).split()
        return bool(want) and any(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1))
    raise ValueError(f"unknown Reefknot task {task!r}: use {list(REEFKNOT_FILES)}")


def reefknot_metrics(correct, tasks, relation_types, answers=None):
    """Accuracy and hallucination rate (1 - accuracy) per task, overall and per relation type, and their mean over
    the tasks present (Reefknot's R-score is 1 - that mean hallucination rate, i.e. the mean accuracy)."""
    def score(ok):
        acc = mean(ok)
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
            rep["yes_ratio"] = mean(reefknot_says_yes(answers[i]) for i in idx)
        report[task] = rep
    present = [t for t in REEFKNOT_FILES if t in report]
    report["mean"] = dict(accuracy=mean(report[t]["accuracy"] for t in present),
                          hallucination_rate=mean(report[t]["hallucination_rate"] for t in present), tasks=present)
    return report


def load(reefknot_dir, folders, limit=None, predictions=""):
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
        raw = read_list(path)
        for k, r in enumerate(raw, 1):
            missing = [f for f in ("image_id", "query_prompt", "label") if f not in r]
            if missing:
                raise ValueError(f"{path}: line {k} has no {missing}; Reefknot items hold image_id, query_prompt, "
                                 "label (and relation_type)")
            rows.append(dict(task=task, image=str(r["image_id"]), query=r["query_prompt"],
                             label=str(r["label"]), relation_type=r.get("relation_type") or "unspecified"))
        rows = with_answers(rows, path, raw, predictions)
        rows, k = keep_with_images(rows[:limit or None], ["image"], folders, f"reefknot/{REEFKNOT_FILES[task]}")
        items += rows
        skipped += k
    return items, skipped


def run(r, items, answer_suffix=""):
    """The Reefknot report: each answer read as Reefknot's utils.py reads it, per task and relation type."""
    said = answers_for(r, items, [(it["query"] + answer_suffix, it["image"], None) for it in items],
                   MAX_NEW_TOKENS, "reefknot")
    correct = [reefknot_correct(it["task"], a, it["label"]) for it, a in zip(items, said)]
    rep = reefknot_metrics(correct, [it["task"] for it in items], [it["relation_type"] for it in items], said)
    rep["reading"] = READING
    rep["examples"] = [dict(task=it["task"], query=it["query"], label=it["label"], answer=a, correct=ok)
                       for it, a, ok in list(zip(items, said, correct))[:8]]
    return rep


def markdown(rk, skipped=""):
    """The report's Reefknot section, as markdown lines; skipped: " (k skipped)" or ""."""
    types = sorted({rt for t in REEFKNOT_FILES if t in rk for rt in rk[t]["by_relation_type"]})
    md = ["## Reefknot (relation hallucination)", "",
          "| task | n | accuracy | hallucination rate | " + " | ".join(f"halluc. {rt}" for rt in types) + " |",
          "|---|---|---|---|" + "---|" * len(types)]
    for t in REEFKNOT_FILES:
        if t in rk:
            by = rk[t]["by_relation_type"]
            md.append(f"| {t} | {rk[t]['n']} | {pct(rk[t]['accuracy'])} | {pct(rk[t]['hallucination_rate'])} | " +
                      " | ".join(pct(get(by, rt, "hallucination_rate")) for rt in types) + " |")
    md.append(f"| **mean** | | {pct(rk['mean']['accuracy'])} | {pct(rk['mean']['hallucination_rate'])} |" +
              " |" * len(types))
    if "yesno" in rk:
        md.append(f"\nYESNO yes-ratio {pct(rk['yesno']['yes_ratio'])}")
    md.append(f"\nreading: {rk['reading']}{'; ' + skipped.strip(' ()') if skipped else ''}")
    md.append("")
    return md
