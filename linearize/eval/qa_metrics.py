"""Answer scoring of generated text, as lm-evaluation-harness scores SQuAD, DROP and CoQA.

- SQuAD (the official script, which lm-eval's squadv2 metric wraps): lower-case, strip punctuation, the articles
  a/an/the and extra whitespace; exact match and token-level F1, each the maximum over the gold answers.
- DROP (lm-eval's `drop/utils.py`): answers are bags of spans; each span is normalised per token (numbers as
  floats, punctuation kept inside numbers); EM compares the span sets, F1 aligns predicted and gold bags one to
  one (maximum total F1) and only counts a pair when their numbers agree; rounded to 2 decimals; maximum over the
  gold answers.
- CoQA (lm-eval's `coqa/utils.py`): SQuAD EM/F1 on the first line of the answer; with several gold answers, each
  is left out in turn and the prediction scored against the others (maximum), then averaged.
- contains: a gold answer occurs in the generation, case-insensitively (lm-eval's `contains_score`).
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _squad_exact(gold: str, pred: str) -> float:
    return float(squad_normalize(gold) == squad_normalize(pred))


def _squad_f1(gold: str, pred: str) -> float:
    gold_toks, pred_toks = squad_normalize(gold).split(), squad_normalize(pred).split()
    if not gold_toks or not pred_toks:
        # The official script: an empty answer is right only against an empty gold answer.
        return float(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_scores(pred: str, golds: list[str]) -> dict:
    return {
        "em": max(_squad_exact(g, pred) for g in golds),
        "f1": max(_squad_f1(g, pred) for g in golds),
        "contains": contains(pred, golds),
    }


def contains(pred: str, golds: list[str]) -> float:
    low = pred.lower()
    return float(any(g.lower() in low for g in golds if g))


def coqa_scores(pred: str, golds: list[str]) -> dict:
    pred = pred.strip().split("\n")[0]
    unique: list[str] = []
    for g in golds:  # lm-eval adds the extra annotators' answers only when they differ (case-insensitively)
        if g.lower() not in map(str.lower, unique):
            unique.append(g)
    if len(unique) > 1:
        subsets = [unique[:i] + unique[i + 1 :] for i in range(len(unique))]
    else:
        subsets = [unique]
    em = sum(max(_squad_exact(g, pred) for g in s) for s in subsets) / len(subsets)
    f1 = sum(max(_squad_f1(g, pred) for g in s) for s in subsets) / len(subsets)
    return {"em": em, "f1": f1, "contains": contains(pred, unique)}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _drop_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(ch for ch in token if ch not in _PUNCT)
    if _is_number(token):
        token = str(float(token))
    return " ".join(_ARTICLES.sub(" ", token).split())


def drop_normalize(span: str) -> str:
    tokens = [_drop_token(t) for t in re.split(" |-", span)]
    return " ".join(t for t in tokens if t.strip()).strip()


def _bags(answer: list[str] | tuple[str, ...]) -> tuple[list[str], list[set[str]]]:
    spans = [drop_normalize(s) for s in answer]
    return spans, [set(s.split()) for s in spans]


def _bag_f1(pred: set[str], gold: set[str]) -> float:
    same = len(gold & pred)
    precision = same / len(pred) if pred else 1.0
    recall = same / len(gold) if gold else 1.0
    return 0.0 if precision == 0.0 and recall == 0.0 else 2 * precision * recall / (precision + recall)


def _numbers_agree(gold: set[str], pred: set[str]) -> bool:
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in pred if _is_number(w)})


def drop_em_f1(predicted: list[str], gold: list[str] | tuple[str, ...]) -> tuple[float, float]:
    """EM and F1 of one predicted answer (a list of spans) against one gold answer."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    pred_spans, pred_bags = _bags(predicted)
    gold_spans, gold_bags = _bags(gold)
    em = float(set(pred_spans) == set(gold_spans) and len(pred_spans) == len(gold_spans))
    scores = np.zeros((len(gold_bags), len(pred_bags)))
    for i, g in enumerate(gold_bags):
        for j, p in enumerate(pred_bags):
            if _numbers_agree(g, p):
                scores[i, j] = _bag_f1(p, g)
    rows, cols = linear_sum_assignment(-scores)
    best = np.zeros(max(len(gold_bags), len(pred_bags)))
    for r, c in zip(rows, cols, strict=True):
        best[r] = max(best[r], scores[r, c])
    return em, round(float(np.mean(best)), 2)


def drop_scores(pred: str, golds: list[list[str]]) -> dict:
    em, f1 = 0.0, 0.0
    for gold in golds:
        if gold and gold[0].strip():
            e, f = drop_em_f1([pred], gold)
            em, f1 = max(em, e), max(f1, f)
    return {"em": em, "f1": f1, "contains": contains(pred, [s for g in golds for s in g])}
