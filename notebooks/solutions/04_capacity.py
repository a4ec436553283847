"""Solutions of lab 4 (capacity and dropping)."""
import math

import numpy as np


def capacity(tokens, k, num_experts, factor):
    q = factor * (tokens * k) / num_experts
    if abs(q - round(q)) <= 4 * np.finfo(float).eps * q:   # 1.1 * 100 / 10 = 11.000000000000002
        q = round(q)
    return min(math.ceil(q), tokens * k)


def keep_arrival_order(ids, num_experts, capacity):
    T, k = ids.shape
    keep = np.zeros((T, k), dtype=np.int32)
    fill = np.zeros(num_experts, dtype=np.int64)
    for j in range(k):              # slot-major: every first choice before any second choice
        for t in range(T):
            e = ids[t, j]
            if fill[e] < capacity:
                fill[e] += 1
                keep[t, j] = 1
    return keep
