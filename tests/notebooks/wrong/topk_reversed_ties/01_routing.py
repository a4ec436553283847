"""A typical mistake in lab 1: top-k as a reversed ascending argsort, which sends exact ties to the
HIGHER expert id. The runner test must fail at the top-k check, naming the tie rule."""
import numpy as np


def topk(values, k):
    return np.argsort(values, axis=-1, kind="stable")[:, ::-1][:, :k]
