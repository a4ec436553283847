"""The check cells must be trustworthy: every correct solution passes, and each typical mistake
fails with its own message. Runs every labcheck.check_* on the solutions (notebooks/solutions/) and
on deliberately wrong versions; no notebook kernel involved, a few seconds.

    /usr/bin/python3 tests/notebooks/test_labcheck.py
"""
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "notebooks"))
import labcheck  # noqa: E402


def solutions(stem):
    spec = importlib.util.spec_from_file_location(f"sol_{stem}", ROOT / "notebooks" / "solutions" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


s1, s2, s3, s4, s5, s6, s7 = (solutions(n) for n in (
    "01_routing", "02_balancing", "03_numerics", "04_capacity", "05_specialisation", "06_kernels",
    "07_scale"))
failures = []
passed = 0


def passes(name, check, fn, *args):
    global passed
    try:
        check(fn, *args)
        passed += 1
    except labcheck.LabCheckError as e:
        failures.append(f"{name}: the correct solution failed: {e}")


def fails(name, check, fn, expected, *args):
    """check(fn) must raise LabCheckError whose message contains `expected`."""
    global passed
    try:
        check(fn, *args)
    except labcheck.LabCheckError as e:
        if expected in str(e):
            passed += 1
        else:
            failures.append(f"{name}: message lacks {expected!r}: {e}")
        return
    except Exception as e:  # noqa: BLE001  a check must never crash on a wrong answer
        failures.append(f"{name}: crashed instead of failing: {type(e).__name__}: {e}")
        return
    failures.append(f"{name}: a wrong solution PASSED")


def quiet(f):
    import contextlib, io
    def run(*a, **k):
        with contextlib.redirect_stdout(io.StringIO()):
            return f(*a, **k)
    return run


# ---- lab 1 ---------------------------------------------------------------------------------------
def softmax_axis0(x):
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def softmax_naive(x):
    return np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True)


def softmax_no_keepdims(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def topk_ascending(v, k):
    return np.argsort(v, axis=1)[:, :k]


def topk_reversed_ties(v, k):
    return np.argsort(v, axis=1, kind="stable")[:, ::-1][:, :k]


def topk_unsorted(v, k):
    return np.sort(np.argsort(-v, axis=1, kind="stable")[:, :k], axis=1)


def topk_float(v, k):
    return s1.topk(v, k).astype(float)


def topk_flat(v, k):
    return s1.topk(v, k).ravel()


def route_always_renorm(logits, k, renormalize):
    return s1.route_softmax_topk(logits, k, True)


def route_never_renorm(logits, k, renormalize):
    return s1.route_softmax_topk(logits, k, False)


def mixtral_no_renorm(logits, k):
    p = s1.softmax(logits)
    ids = s1.topk(logits, k)
    return ids, np.take_along_axis(p, ids, 1)


def mixtral_gates_unaligned(logits, k):
    ids, gates = s1.route_mixtral(logits, k)
    return ids, gates[:, ::-1]


def mixtral_topk_scores_sigmoid(logits, k):   # top-k of a saturating score instead of the logits
    scores = np.round(1 / (1 + np.exp(-logits)), 1)
    ids = s1.topk(scores, k)
    return ids, s1.softmax(np.take_along_axis(logits, ids, 1))


def ds_biased_gates(logits, bias, k, n_group, topk_group, scaling):
    ids, _ = s1.route_deepseek_v3(logits, bias, k, n_group, topk_group, scaling)
    w = np.take_along_axis(1 / (1 + np.exp(-logits)) + bias, ids, 1)
    return ids, w / w.sum(1, keepdims=True) * scaling


def ds_no_groups(logits, bias, k, n_group, topk_group, scaling):
    return s1.route_deepseek_v3(logits, bias, k, 1, 1, scaling)


def ds_no_scaling(logits, bias, k, n_group, topk_group, scaling):
    return s1.route_deepseek_v3(logits, bias, k, n_group, topk_group, 1.0)


def ds_zero_mask(logits, bias, k, n_group, topk_group, scaling):
    s = 1 / (1 + np.exp(-logits))
    b = s + bias
    T, E = s.shape
    gs = np.sort(b.reshape(T, n_group, -1), -1)[..., -2:].sum(-1)
    allowed = np.zeros((T, n_group), bool)
    np.put_along_axis(allowed, s1.topk(gs, topk_group), True, 1)
    ids = s1.topk(np.where(np.repeat(allowed, E // n_group, 1), b, 0.0), k)
    w = np.take_along_axis(s, ids, 1)
    return ids, w / w.sum(1, keepdims=True) * scaling


c = labcheck
passes("softmax", quiet(c.check_softmax), s1.softmax)
fails("softmax axis 0", quiet(c.check_softmax), softmax_axis0, "sum to 1 down each column")
fails("softmax naive", quiet(c.check_softmax), softmax_naive, "Subtract each row's max")
fails("softmax whole matrix", quiet(c.check_softmax), softmax_no_keepdims, "over the whole matrix")
passes("topk", quiet(c.check_topk), s1.topk)
fails("topk ascending", quiet(c.check_topk), topk_ascending, "k SMALLEST")
fails("topk reversed ties", quiet(c.check_topk), topk_reversed_ties, "LOWER expert id")
fails("topk unsorted", quiet(c.check_topk), topk_unsorted, "not best first")
fails("topk float ids", quiet(c.check_topk), topk_float, "must be integers")
fails("topk flat", quiet(c.check_topk), topk_flat, "has shape (16,), expected (16, 1)")
passes("route_softmax_topk", quiet(c.check_route_softmax_topk), s1.route_softmax_topk)
fails("softmax_topk always renorm", quiet(c.check_route_softmax_topk), route_always_renorm, "sum to 1 for every token")
fails("softmax_topk never renorm", quiet(c.check_route_softmax_topk), route_never_renorm, "renormalises them over the top-k")
passes("route_mixtral", quiet(c.check_route_mixtral), s1.route_mixtral)
fails("mixtral no renorm", quiet(c.check_route_mixtral), mixtral_no_renorm, "Mixtral renormalises over the top-k only")
fails("mixtral unaligned gates", quiet(c.check_route_mixtral), mixtral_gates_unaligned, "attached to the wrong experts")
fails("mixtral top-k of rounded scores", quiet(c.check_route_mixtral), mixtral_topk_scores_sigmoid, "chose experts")
passes("route_deepseek_v3", quiet(c.check_route_deepseek_v3), s1.route_deepseek_v3)
fails("deepseek biased gates", quiet(c.check_route_deepseek_v3), ds_biased_gates, "BIASED scores")
fails("deepseek no groups", quiet(c.check_route_deepseek_v3), ds_no_groups, "group limit")
fails("deepseek no scaling", quiet(c.check_route_deepseek_v3), ds_no_scaling, "routed_scaling_factor")
fails("deepseek zero mask", quiet(c.check_route_deepseek_v3), ds_zero_mask, "-inf")



def mixtral_logits_as_gates(logits, k):
    ids = s1.topk(logits, k)
    return ids, np.take_along_axis(logits, ids, 1)


def ds_variant(**kw):
    def route(logits, bias, k, n_group, topk_group, scaling):
        return c._deepseek_v3(logits, bias, k, n_group, topk_group, scaling, **kw)
    return route


fails("mixtral logits as gates", quiet(c.check_route_mixtral), mixtral_logits_as_gates, "selected logits themselves")
fails("deepseek max group score", quiet(c.check_route_deepseek_v3), ds_variant(group_score="max"), "SUM of its top-2")
fails("deepseek no renorm", quiet(c.check_route_deepseek_v3), ds_variant(renorm=False), "not renormalised")
fails("deepseek softmax", quiet(c.check_route_deepseek_v3), ds_variant(scoring="softmax"), "sigmoid")

# ---- lab 2 ---------------------------------------------------------------------------------------
passes("expert_load", quiet(c.check_expert_load), s2.expert_load)
fails("load no minlength", quiet(c.check_expert_load), lambda ids, E: np.bincount(ids.ravel()), "minlength")
fails("load first only", quiet(c.check_expert_load), lambda ids, E: np.bincount(ids[:, 0], minlength=E), "first choice")
passes("switch_aux_loss", quiet(c.check_switch_aux_loss), s2.switch_aux_loss)


def aux_hf(probs, ids, alpha):
    T, E = probs.shape
    return alpha * E * np.sum(np.bincount(ids.ravel(), minlength=E) / T * probs.mean(0))


def aux_no_E(probs, ids, alpha):
    return s2.switch_aux_loss(probs, ids, alpha) / probs.shape[1]


fails("aux k times", quiet(c.check_switch_aux_loss), aux_hf, "k = 2 times too large")
fails("aux no E", quiet(c.check_switch_aux_loss), aux_no_E, "missing the factor E")
passes("bias_update", quiet(c.check_bias_update), s2.bias_update)

def aux_first_only(probs, ids, alpha):
    T, E = probs.shape
    return alpha * E * np.sum(np.bincount(ids[:, 0], minlength=E) / T * probs.mean(0))


def aux_p_from_gates(probs, ids, alpha):
    T, E = probs.shape
    P = np.zeros(E)
    np.add.at(P, ids.ravel(), np.take_along_axis(probs, ids, 1).ravel())
    return alpha * E * np.sum(np.bincount(ids.ravel(), minlength=E) / ids.size * P / T)


def aux_mean(probs, ids, alpha):
    return s2.switch_aux_loss(probs, ids, alpha) / probs.shape[1]


fails("aux first only", quiet(c.check_switch_aux_loss), aux_first_only, "first choice")
fails("aux P from gates", quiet(c.check_switch_aux_loss), aux_p_from_gates, "over ALL tokens")

fails("bias sign", quiet(c.check_bias_update), lambda b, l, g: b + g * np.sign(l - l.mean()), "sign is reversed")
fails("bias proportional", quiet(c.check_bias_update), lambda b, l, g: b + g * (l.mean() - l), "fixed step")
fails("bias ties", quiet(c.check_bias_update), lambda b, l, g: b + np.where(l < l.mean(), g, -g), "sign(0) = 0")


def bias_in_place(b, l, g):
    b += g * np.sign(l.mean() - l)
    return b


fails("bias in place", quiet(c.check_bias_update), bias_in_place, "in place")

# ---- lab 3 ---------------------------------------------------------------------------------------
passes("round_to_bf16", quiet(c.check_round_to_bf16), s3.round_to_bf16)
fails("bf16 truncate", quiet(c.check_round_to_bf16),
      lambda x: (np.asarray(x, np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32), "truncated")
fails("bf16 half up", quiet(c.check_round_to_bf16),
      lambda x: np.where(np.isnan(x), x, ((np.asarray(x, np.float32).view(np.uint32).astype(np.uint64) + 0x8000) >> 16 << 16).astype(np.uint32).view(np.float32)),
      "round to EVEN")
fails("bf16 float64", quiet(c.check_round_to_bf16), lambda x: s3.round_to_bf16(x).astype(np.float64), "dtype float64")
passes("z_loss", quiet(c.check_z_loss), s3.z_loss)


def bf16_nan_to_inf(x):
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)


def lse(z):
    return z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))


fails("bf16 NaN", quiet(c.check_round_to_bf16), bf16_nan_to_inf, "NaN")
fails("z square of mean", quiet(c.check_z_loss), lambda z, c_: c_ * np.mean(lse(z)) ** 2, "squared the average")
fails("z log of mean", quiet(c.check_z_loss), lambda z, c_: c_ * np.mean(np.log(np.exp(z).mean(1)) ** 2), "SUM of the")
fails("z max", quiet(c.check_z_loss), lambda z, c_: c_ * np.mean(z.max(1) ** 2), "max logit")

fails("z naive", quiet(c.check_z_loss), lambda z, c_: c_ * np.mean(np.log(np.exp(z).sum(1)) ** 2), "stably")
fails("z sum", quiet(c.check_z_loss), lambda z, c_: s3.z_loss(z, c_) * z.shape[0], "summed over the tokens")
fails("z not squared", quiet(c.check_z_loss),
      lambda z, c_: c_ * np.mean(z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))), "SQUARED")

# ---- lab 4 ---------------------------------------------------------------------------------------
passes("capacity", quiet(c.check_capacity), s4.capacity)
fails("capacity floor", quiet(c.check_capacity), lambda T, k, E, f: int(f * T * k / E), "DOWN")
fails("capacity no k", quiet(c.check_capacity), lambda T, k, E, f: math.ceil(f * T / E), "forgot k")
fails("capacity naive ceil", quiet(c.check_capacity), lambda T, k, E, f: min(math.ceil(f * T * k / E), T * k), "snaps")
fails("capacity no cap", quiet(c.check_capacity), lambda T, k, E, f: s4.capacity(T, k, E, f) if f < 5 else math.ceil(f * T * k / E), "cap it")
passes("keep_arrival_order", quiet(c.check_keep_arrival_order), s4.keep_arrival_order)


def keep_off_by_one(ids, E, cap):
    return s4.keep_arrival_order(ids, E, cap + 1)


def keep_token_major(ids, E, cap):
    keep = np.zeros(ids.shape, np.int32)
    fill = np.zeros(E, int)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if fill[ids[t, j]] < cap:
                fill[ids[t, j]] += 1
                keep[t, j] = 1
    return keep


fails("keep off by one", quiet(c.check_keep_arrival_order), keep_off_by_one, "off by one")
fails("keep token major", quiet(c.check_keep_arrival_order), keep_token_major, "slot-major")

# ---- lab 5 ---------------------------------------------------------------------------------------
passes("mutual_information", quiet(c.check_mutual_information), s5.mutual_information)
fails("mi bits", quiet(c.check_mutual_information), lambda n: s5.mutual_information(n) / np.log(2), "bits")


def mi_nan(n):
    p = n / n.sum()
    return np.sum(p * np.log(p / (p.sum(1, keepdims=True) @ p.sum(0, keepdims=True))))


fails("mi nan", quiet(c.check_mutual_information), mi_nan, "p > 0")

fails("mi sign", quiet(c.check_mutual_information), lambda n: -s5.mutual_information(n), "sign is reversed")
passes("flip_bit_bf16", quiet(c.check_flip_bit_bf16), s5.flip_bit_bf16)
fails("flip float32 bit", quiet(c.check_flip_bit_bf16),
      lambda x, b: (np.asarray(x, np.float32).view(np.uint32) ^ np.uint32(1 << b)).view(np.float32), "TOP 16 bits")

# ---- lab 6 ---------------------------------------------------------------------------------------
passes("dispatch_plan", quiet(c.check_dispatch_plan), s6.dispatch_plan)


def plan_inclusive(ids, keep, E):
    counts, offsets, rt, rs = s6.dispatch_plan(ids, keep, E)
    return counts, offsets[1:], rt, rs


def plan_with_dropped(ids, keep, E):
    return s6.dispatch_plan(ids, np.ones_like(keep), E)


def plan_token_major(ids, keep, E):
    counts, offsets, rt, rs = s6.dispatch_plan(ids, keep, E)
    t, s = np.nonzero(keep)
    return counts, offsets, t, s


fails("plan inclusive", quiet(c.check_dispatch_plan), plan_inclusive, "INCLUSIVE")


def plan_no_minlength(ids, keep, E):
    counts, offsets, rt, rs = s6.dispatch_plan(ids, keep, E)
    return np.trim_zeros(counts, "b"), offsets, rt, rs


def plan_e_offsets(ids, keep, E):
    counts, offsets, rt, rs = s6.dispatch_plan(ids, keep, E)
    return counts, offsets[:-1], rt, rs


fails("plan counts no minlength", quiet(c.check_dispatch_plan), plan_no_minlength, "minlength")
fails("plan E offsets", quiet(c.check_dispatch_plan), plan_e_offsets, "E + 1")

fails("plan dropped", quiet(c.check_dispatch_plan), plan_with_dropped, "DROPPED")
fails("plan token major", quiet(c.check_dispatch_plan), plan_token_major, "grouped by expert")
passes("grouped_swiglu", quiet(c.check_grouped_swiglu), s6.grouped_swiglu)


def swiglu_swapped(x, rt, off, wg, wu, wd):
    return s6.grouped_swiglu(x, rt, off, wu, wg, wd)


fails("swiglu swapped", quiet(c.check_grouped_swiglu), swiglu_swapped, "UP projection")


def swiglu_act(act):
    def grouped(x, rt, off, wg, wu, wd):
        out = np.zeros((len(rt), x.shape[1]))
        for e in range(len(off) - 1):
            xe = x[rt[off[e]:off[e + 1]]]
            out[off[e]:off[e + 1]] = (act(xe @ wg[e].T) * (xe @ wu[e].T)) @ wd[e].T
        return out
    return grouped


fails("swiglu relu", quiet(c.check_grouped_swiglu), swiglu_act(lambda v: np.maximum(v, 0)), "ReLU")
fails("swiglu sigmoid", quiet(c.check_grouped_swiglu), swiglu_act(lambda v: 1 / (1 + np.exp(-v))), "sigmoid(v) is not silu")

passes("combine", quiet(c.check_combine), s6.combine)


def combine_buffered(out, rt, w, T):
    y = np.zeros((T, out.shape[1]))
    y[rt] += w[:, None] * out
    return y


fails("combine buffered", quiet(c.check_combine), combine_buffered, "np.add.at")
fails("combine no gates", quiet(c.check_combine), lambda o, rt, w, T: s6.combine(o, rt, np.ones_like(w), T), "without their gates")

# ---- lab 7 ---------------------------------------------------------------------------------------
passes("expert_params", quiet(c.check_expert_params), s7.expert_params)
fails("expert two matrices", quiet(c.check_expert_params), lambda C, H, a: 2 * C * H, "THREE matrices")
fails("expert one matrix", quiet(c.check_expert_params), lambda C, H, a: C * H, "one matrix")
sizes = c.lab_sizes("deepseek_v3")
acct = c.lab_account("deepseek_v3")
passes("total_and_active", quiet(c.check_total_and_active), s7.total_and_active, sizes,
       acct["total_params"], acct["active_params"], "DeepSeek-V3")


def with_embedding(s):
    total, active = s7.total_and_active(s)
    return total, active + s["vocab"] * s["hidden"]


def all_experts_active(s):
    return s7.total_and_active(s)[0], s7.total_and_active({**s, "top_k": s["experts"]})[1]


def no_shared(s):
    return s7.total_and_active({**s, "shared_experts": 0})


fails("active with embedding", quiet(c.check_total_and_active), with_embedding, "embedding table",
      sizes, acct["total_params"], acct["active_params"], "DeepSeek-V3")
fails("active all experts", quiet(c.check_total_and_active), all_experts_active, "top_k = 8",
      sizes, acct["total_params"], acct["active_params"], "DeepSeek-V3")
fails("no shared", quiet(c.check_total_and_active), no_shared, "shared experts",
      sizes, acct["total_params"], acct["active_params"], "DeepSeek-V3")


def no_dense(s):
    return s7.total_and_active({**s, "dense_layers": 0, "layers": s["layers"]})


def no_dense_ffn(s):
    total, active = s7.total_and_active(s)
    dense = s["dense_layers"] * 3 * s["hidden"] * s["dense_intermediate"]
    return total - dense, active - dense


def no_head(s):
    total, active = s7.total_and_active(s)
    return total - s["vocab"] * s["hidden"], active - s["vocab"] * s["hidden"]


fails("no dense layers", quiet(c.check_total_and_active), no_dense_ffn, "dense FFN layers",
      sizes, acct["total_params"], acct["active_params"], "DeepSeek-V3")
fails("no head", quiet(c.check_total_and_active), no_head, "embedding and/or output head",
      sizes, acct["total_params"], acct["active_params"], "DeepSeek-V3")
sizes = c.lab_sizes("mixtral")
acct = c.lab_account("mixtral")
passes("total_and_active mixtral", quiet(c.check_total_and_active), s7.total_and_active, sizes,
       acct["total_params"], acct["active_params"], "Mixtral 8x7B")

print(f"{passed} checks behaved as expected, {len(failures)} did not")
for f in failures:
    print("FAIL " + f)
sys.exit(1 if failures else 0)
