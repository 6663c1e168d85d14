"""
CR, SugarCrepe-style compositional reasoning: does the model prefer an image's caption to a hard negative (an object,
attribute or relation swapped, replaced or added)? Both protocols are ours (SugarCrepe scores contrastive models).

Files: cr/{subset}.json, SugarCrepe's layout {id: {"filename", "caption", "negative_caption"}}, one file a subset.
mcq: MCQ_PROMPT asked in both orders (positive as (A), then as (B)), greedy, read by parse_choice; accuracy per order
and averaged, per subset and the unweighted mean. likelihood: length-normalised log P(caption + <eos> | image,
caption_prompt) of the positive vs the negative caption.
"""
import os
import re

from tasks.common import CAPTION_PROMPT, field, get, keep_with_images, mean, pct, plain_words, read_rows

CR_ORDER = ["swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel", "add_obj", "add_att"]
MCQ_PROMPT = "Which caption describes the image?\n(A) {a}\n(B) {b}\nAnswer with A or B."
MAX_NEW_TOKENS = 40  # room for an answer that repeats a caption


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
    padded = f" {plain_words(answer)} "
    hits = [i for i, c in enumerate(captions) if plain_words(c) and f" {plain_words(c)} " in padded]
    if len(hits) == 2:  # one caption inside the other (e.g. an added object): the longer one was said
        la, lb = (len(plain_words(c)) for c in captions)
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


def unknownplain_words(tok, text):
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


def subset_names(cr_dir):
    names = [f[:-5] for f in os.listdir(cr_dir) if f.endswith(".json")]
    return [s for s in CR_ORDER if s in names] + sorted(s for s in names if s not in CR_ORDER)


def load(cr_dir, folders, limit=None):
    """(items, skipped): every subset file in cr_dir (CR_ORDER first), `limit` items each, images checked."""
    items, skipped = [], 0
    for subset in subset_names(cr_dir):
        rows = read_rows(os.path.join(cr_dir, subset + ".json"))
        rows = list(rows.values()) if isinstance(rows, dict) else rows
        where = os.path.join(cr_dir, subset + ".json")
        sub = [dict(subset=subset, image=field(r, "filename", where), pos=field(r, "caption", where),
                    neg=field(r, "negative_caption", where)) for r in rows[:limit or None]]
        sub, k = keep_with_images(sub, ["image"], folders, f"cr/{subset}")
        items += sub
        skipped += k
    return items, skipped


def run(r, items, protocols, mcq_prompt=MCQ_PROMPT, caption_prompt=CAPTION_PROMPT):
    """The CR report: per subset and averaged, MCQ in both orders and / or the caption likelihood (`protocols`)."""
    subsets = list(dict.fromkeys(it["subset"] for it in items))
    report = dict(subsets=subsets)
    if "mcq" in protocols:
        # all items with the positive as (A), then all with the positive as (B)
        specs = [(mcq_prompt.format(a=it["pos"], b=it["neg"]), it["image"], None) for it in items]
        specs += [(mcq_prompt.format(a=it["neg"], b=it["pos"]), it["image"], None) for it in items]
        answers = r.generate(specs, MAX_NEW_TOKENS, "cr mcq")
        n = len(items)
        choices = [parse_choice(a, (it["pos"], it["neg"])) for a, it in zip(answers[:n], items)]
        choices += [parse_choice(a, (it["neg"], it["pos"])) for a, it in zip(answers[n:], items)]
        per = {s: mcq_accuracy([c for c, it in zip(choices[:n], items) if it["subset"] == s],
                               [c for c, it in zip(choices[n:], items) if it["subset"] == s]) for s in subsets}
        report["mcq"] = dict(avg=mean(v["acc"] for v in per.values()), per_subset=per,
                             invalid=mean(v["invalid"] for v in per.values()),
                             unknown_words=unknownplain_words(r.tok, mcq_prompt.format(a="", b="")),
                             examples=[dict(subset=it["subset"], pos=it["pos"], neg=it["neg"], answer_pos_first=a1,
                                            answer_pos_second=a2) for it, a1, a2 in
                                       list(zip(items, answers[:n], answers[n:]))[:8]])
    if "likelihood" in protocols:
        specs = [(caption_prompt, it["image"], c) for it in items for c in (it["pos"], it["neg"])]
        lp = r.loglik(specs, "cr likelihood")
        right = [lp[2 * i] > lp[2 * i + 1] for i in range(len(items))]
        per = {s: dict(n=sum(it["subset"] == s for it in items),
                       acc=mean(ok for ok, it in zip(right, items) if it["subset"] == s)) for s in subsets}
        report["likelihood"] = dict(avg=mean(v["acc"] for v in per.values()), per_subset=per)
    return report


def markdown(c, skipped=""):
    """The report's CR section, as markdown lines; skipped: " (k skipped)" or ""."""
    md = ["## CR (SugarCrepe-style)", "",
          "| subset | n | MCQ pos (A) | MCQ pos (B) | MCQ avg | MCQ both | MCQ invalid | likelihood |",
          "|---|---|---|---|---|---|---|---|"]
    for s in c["subsets"]:
        m, l = get(c, "mcq", "per_subset", s) or {}, get(c, "likelihood", "per_subset", s) or {}
        n = m.get("n", l.get("n"))
        md.append(f"| {s} | {n} | {pct(m.get('acc_pos_first'))} | {pct(m.get('acc_pos_second'))} | "
                  f"{pct(m.get('acc'))} | {pct(m.get('both'))} | {pct(m.get('invalid'))} | {pct(l.get('acc'))} |")
    md.append(f"| **mean** | | | | {pct(get(c, 'mcq', 'avg'))} | | {pct(get(c, 'mcq', 'invalid'))} | "
              f"{pct(get(c, 'likelihood', 'avg'))} |")
    md.append(f"\nn: items per subset{skipped}; readings ours: MCQ answers by parse_choice, likelihood "
              "by length-normalised log P(caption)")
    if get(c, "mcq", "unknown_words"):
        md.append(f"\nMCQ prompt words unknown to the tokenizer (<unk>): {' '.join(c['mcq']['unknown_words'])}")
    md.append("")
    return md
