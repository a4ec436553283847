"""Solutions of lab 3 (numerics)."""
import numpy as np


def round_to_bf16(x):
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    lowest_kept = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lowest_kept) >> 16) << 16      # round to nearest, ties to even
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, out)                       # a NaN stays a NaN


def z_loss(logits, coef):
    m = logits.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1))
    return coef * np.mean(lse ** 2)
