"""Solutions of lab 1 (routing). The test suite substitutes these for the exercise cells of
01_routing.ipynb (notebooks/run_notebook.py --solutions). Each function is what a student writes."""
import numpy as np


def softmax(logits):
    # Subtract each row's max: the same function, but no exponent is above 0, so nothing overflows.
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def topk(values, k):
    # A stable sort of the negated values: best first, and equal values keep their order (lower id).
    return np.argsort(-values, axis=-1, kind="stable")[:, :k]


def route_softmax_topk(logits, k, renormalize):
    probs = softmax(logits)
    ids = topk(probs, k)
    gates = np.take_along_axis(probs, ids, axis=-1)
    if renormalize:
        gates = gates / gates.sum(axis=-1, keepdims=True)
    return ids, gates


def route_mixtral(logits, k):
    ids = topk(logits, k)
    gates = softmax(np.take_along_axis(logits, ids, axis=-1))
    return ids, gates


def route_deepseek_v3(logits, bias, k, n_group, topk_group, scaling):
    scores = 1.0 / (1.0 + np.exp(-logits))                # sigmoid, eq. 15
    biased = scores + bias                                 # the bias only chooses
    T, E = scores.shape
    groups = biased.reshape(T, n_group, E // n_group)
    group_score = np.sort(groups, axis=-1)[..., -2:].sum(axis=-1)   # sum of each group's top 2
    best_groups = topk(group_score, topk_group)
    allowed = np.zeros((T, n_group), dtype=bool)
    np.put_along_axis(allowed, best_groups, True, axis=-1)
    allowed = np.repeat(allowed, E // n_group, axis=-1)
    ids = topk(np.where(allowed, biased, -np.inf), k)
    weights = np.take_along_axis(scores, ids, axis=-1)     # unbiased scores
    gates = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20) * scaling
    return ids, gates
