"""Solutions of lab 5 (specialisation)."""
import numpy as np


def mutual_information(counts):
    p = counts / counts.sum()
    p_domain = p.sum(axis=1, keepdims=True)
    p_expert = p.sum(axis=0, keepdims=True)
    nz = p > 0
    return np.sum(p[nz] * np.log(p[nz] / (p_domain @ p_expert)[nz]))


def flip_bit_bf16(x, bit):
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    return (bits ^ np.uint32(1 << (bit + 16))).view(np.float32)
