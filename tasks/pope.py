"""
POPE (object hallucination): "Is there a <object> in the image?" over random / popular / adversarial splits.

Files: pope_*.json[l] in POPE's layout (coco_pope_*.json: {"question_id", "image", "text", "label"}) or {"question",
"answer", "image", "category"}; one split per category (default: the file name after "pope_"). A label other than
"yes" / "no" is an error naming file and line.
generate: POPE's evaluate.py (as LLaVA's eval_pope.py): the text before the first ".", commas dropped, split on spaces;
"no" iff a word is exactly No / not / no, everything else "yes". Accuracy, precision, recall, F1 (positive class "yes"),
yes-ratio per split; extra column, ours: invalid (neither yes nor no, case-folded). forced (ours, a model only): "yes"
vs "no" log-probability at the first answer position.
"""
import os
import re
from collections import defaultdict

from tasks.common import answers_for, field, keep_with_images, mean, parse_yes_no, pct, read_list, with_answers

MAX_NEW_TOKENS = 20
READINGS = dict(
    generate="POPE's evaluate.py: first sentence, commas dropped, 'no' iff a word is No / not / no, else 'yes'",
    invalid="ours: answers that say neither yes nor no (parse_yes_no)",
    forced="ours: 'yes' vs 'no' log-probability at the first answer token")


def pope_reading(answer):
    """'yes' / 'no' as POPE's own evaluate.py reads an answer: the text before its first ".", commas dropped, split on
    single spaces; "no" iff one word is exactly "No", "not" or "no"; everything else is "yes" ("Not at all", "NO", "No!"
    included)."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def invalid_rate(answers):
    """The share of answers that say neither yes nor no by our stricter reading (parse_yes_no)."""
    return mean(parse_yes_no(a) is None for a in answers)


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


def load(files, folders, limit=None, predictions=""):
    """POPE files (POPE's own layout: question_id, image, text, label; or question / answer), one split per category
    (default: the file name after "pope_"). A label other than yes / no is an error naming the file and line."""
    items, skipped = [], 0
    for path in files:
        default_split = re.sub(r"^.*pope_", "", os.path.basename(path)).split(".")[0]
        rows, parsed = read_list(path), []
        for k, r in enumerate(rows, 1):
            label = r.get("label", r.get("answer")) if isinstance(r, dict) else None
            if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
                raise ValueError(f"{path}: line {k} has {'label ' + repr(label) if label is not None else 'no label'}; "
                                 "POPE items need \"label\" (or \"answer\"): \"yes\" or \"no\"")
            question = r.get("text", r.get("question"))
            if question is None:
                raise ValueError(f"{path}: line {k} has no 'text' / 'question'")
            parsed.append(dict(question=question, label=label.strip().lower(), image=field(r, "image", path, k),
                               split=r.get("category", default_split)))
        parsed = with_answers(parsed, path, rows, predictions)
        by_split = defaultdict(list)
        for it in parsed:
            by_split[it["split"]].append(it)
        for split, sub in by_split.items():
            sub, k = keep_with_images(sub[:limit or None], ["image"], folders, f"pope/{split}")
            items += sub
            skipped += k
    return items, skipped


def run(r, items, answer_suffix=""):
    """generate: the answers read as POPE reads them (with our invalid rate beside); forced (a model only): "yes" vs
    "no" at the first answer token."""
    specs = [(it["question"] + answer_suffix, it["image"], None) for it in items]
    said = answers_for(r, items, specs, MAX_NEW_TOKENS, "pope generate")
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
        report[name] = dict(reading=READINGS[name], per_split=per,
                            avg={k: mean(v[k] for v in per.values()) for k in keys})
        report[name]["avg"]["n"] = len(items)
    report["generate"]["invalid_reading"] = READINGS["invalid"]
    report["examples"] = [dict(question=it["question"], label=it["label"], answer=a)
                          for it, a in list(zip(items, said))[:8]]
    return report


def markdown(rep, skipped=""):
    """The report's POPE section, as markdown lines; skipped: " (k skipped)" or ""."""
    md = ["## POPE", "", "| split | protocol | n | accuracy | precision | recall | F1 | yes-ratio | invalid (ours) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for proto in ("generate", "forced"):
        p = rep.get(proto)
        for s, m in (list(p["per_split"].items()) + [("**mean**", p["avg"])]) if p else []:
            md.append(f"| {s} | {proto} | {m['n']} | " + " | ".join(pct(m.get(k)) for k in
                      ("accuracy", "precision", "recall", "f1", "yes_ratio", "invalid")) + " |")
    md += ["", f"readings: generate, {rep['generate']['reading']}; invalid, "
           f"{rep['generate']['invalid_reading']}" +
           (f"; forced, {rep['forced']['reading']}" if "forced" in rep else "") +
           f". Mean n: all splits' items{skipped}.", ""]
    return md
