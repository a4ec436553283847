"""A typical mistake in lab 4: `<=` instead of `<` when filling an expert's buffer, so every expert
keeps one pair more than its capacity. The runner test must fail, saying "off by one"."""
import numpy as np


def keep_arrival_order(ids, num_experts, capacity):
    T, k = ids.shape
    keep = np.zeros((T, k), dtype=np.int32)
    fill = np.zeros(num_experts, dtype=np.int64)
    for j in range(k):
        for t in range(T):
            e = ids[t, j]
            if fill[e] <= capacity:
                fill[e] += 1
                keep[t, j] = 1
    return keep
