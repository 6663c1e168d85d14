"""
The evaluation report as files: report.md for one model (the summary row, each benchmark's section, the attention
alignment, the heat maps), the comparison table of several models (--compare), and the writes of report.json /
report.md. evaluate.py fills the report dict; this file only lays it out and writes it. Numbers are fractions in the
dict and percentages in the tables.
"""
import json
import os

import alignment
from tasks import BENCHMARKS, reefknot
from tasks.common import get, pct


def task_n(rep, task):
    """The number of items a task's figures were computed on (None when the report lacks the task)."""
    t = rep.get(task) if isinstance(rep, dict) else None
    if not isinstance(t, dict):
        return None
    if task == "cr":
        per = get(t, "likelihood", "per_subset") or get(t, "mcq", "per_subset") or {}
        return sum(v["n"] for v in per.values())
    if task == "pope":
        return sum(v["n"] for v in (get(t, "generate", "per_split") or {}).values())
    if task == "reefknot":
        return sum(t[k]["n"] for k in reefknot.REEFKNOT_FILES if k in t)
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
    subsets = list(dict.fromkeys(s for rep in reports.values() for s in (get(rep, "cr", "subsets") or [])))
    head = (["model", "n (skipped)", "VQA", "CR mcq", "CR lik"] + [f"{s} (mcq/lik)" for s in subsets] +
            ["POPE F1 (gen/forced)", "Wino group", "Reefknot halluc. (yes-no / mc / vqa / mean)",
             "align VQA (all / img / text q)", "align CR (all / img / text q)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rep in reports.items():
        row = [name, counts(rep), pct(get(rep, "vqa", "accuracy")), pct(get(rep, "cr", "mcq", "avg")),
               pct(get(rep, "cr", "likelihood", "avg"))]
        row += [f"{pct(get(rep, 'cr', 'mcq', 'per_subset', s, 'acc'))} / "
                f"{pct(get(rep, 'cr', 'likelihood', 'per_subset', s, 'acc'))}" for s in subsets]
        row += [f"{pct(get(rep, 'pope', 'generate', 'avg', 'f1'))} / {pct(get(rep, 'pope', 'forced', 'avg', 'f1'))}",
                pct(get(rep, "wino", "group")),
                " / ".join(pct(get(rep, "reefknot", t, "hallucination_rate"))
                           for t in (*reefknot.REEFKNOT_FILES, "mean"))]
        row += [" / ".join(pct(get(rep, "align", t, *form), 2) for form in
                           (("all_queries", "vat_cos"), ("image_queries", "vat_cos"), ("text_queries", "flat_cos")))
                for t in ("vqa", "cr")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(rep):
    """report.md of one model: its row of the comparison table, then each task's section."""
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
    skipped = lambda task: f" ({rep['skipped'][task]} skipped)" if rep.get("skipped", {}).get(task) else ""  # noqa
    for task, bench in BENCHMARKS.items():  # each benchmark's section, written by its file in tasks/
        if task in rep:
            md += bench.markdown(rep[task], skipped(task))
    if "align" in rep:
        md += alignment.markdown(rep["align"])
    if rep.get("heatmaps"):
        md += ["## Attention heat maps", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                                for p in rep["heatmaps"]]
    return "\n".join(md) + "\n"


def write_report(out, rep):
    """report.json and report.md of one model into `out`, each written whole (a temporary file, then renamed): a run
    stopped mid-write leaves the previous version, never half a file."""
    os.makedirs(out, exist_ok=True)
    for fname, text in (("report.json", json.dumps(rep, indent=1)), ("report.md", report_markdown(rep))):
        with open(os.path.join(out, fname + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(out, fname + ".tmp"), os.path.join(out, fname))


def write_comparison(out, data, reports, n_runs, status):
    """--compare's <out>/report.json (every model's report by name) and <out>/report.md (one table, a link to each
    model's own report); `status` ("running", "interrupted" or "" when done) heads the table."""
    table = compare_table(reports)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(reports, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"# Comparison on {data}\n\n" +
                (f"**Status: {status}** ({len(reports)} of {n_runs} models)\n\n" if status else "") +
                f"{table}\n" + "".join(f"- [{n}]({n}/report.md): {r['model']}\n" for n, r in reports.items()))
