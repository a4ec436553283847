#!/usr/bin/python3
"""The independent oracle for moelab's routing (reference/routing.h): every case that
moelab_dump_routing_cases wrote is recomputed here in PyTorch, in float64, from its inputs and its
configuration alone, the way the published model code writes it, and compared with moelab's
outputs. README.md (beside this file) says what is checked and why the tolerances are what they are.

    /usr/bin/python3 routing_oracle.py CASES_DIR_OR_FILE...   (Debian's python3 with python3-torch)

Prints one line per case (PASS / FAIL / AMBIGUOUS / SKIP) and a summary "N passed, M failed" (with
", K skipped" and ", A ambiguous" when there are any). Exits 1 if any case failed (or none was
found), 77 if torch cannot be imported (ctest's SKIP_RETURN_CODE), 0 otherwise.
"""

import copy
import json
import math
import pathlib
import sys
from fractions import Fraction

try:
    import torch
    import torch.nn.functional as F
except Exception as error:  # ImportError, or a broken installation
    print(f"routing_oracle: SKIP: cannot import torch ({error!r}); run it with Debian's /usr/bin/python3 "
          f"and its python3-torch (tools/setup.sh installs it). This interpreter: {sys.executable}")
    sys.exit(77)

torch.set_default_dtype(torch.float64)

# Tolerances. moelab and this oracle evaluate the same float64 formulas with the operations in a
# different order (Eigen's and the BLAS's blocking of x W^T, vectorised exp, the order of the
# reductions over experts and tokens). Each operation rounds by at most 2^-53 = 1.1e-16 relative;
# the longest chain here (a 16-term dot product, a softmax or logsumexp over E <= 16, a
# renormalisation, a mean over T <= 80 tokens) has at most a few hundred roundings, so
# well-conditioned values agree to ~1e-14 relative. 1e-10 leaves four orders of magnitude for that,
# and any real error (a missing factor, a wrong normalisation, a wrong expert) is far larger. The
# absolute 1e-12 is for values near zero produced by cancellation, where no relative bound holds: a
# logit's rounding error is about 1.1e-16 * sqrt(16) * max_c |x_c W_ec|, ~1e-13 in the 'huge' cases.
# Gradients pass through one more chain (softmax Jacobian, renormalisation, x^T G): 1e-9 of the
# largest component (a gradient may be exactly 0 where nothing depends on an input, so no elementwise
# relative bound makes sense). Every case stays below 1e-5 of these bounds; the worst is printed.
ATOL, RTOL = 1e-12, 1e-10            # forward values: |moelab - oracle| <= ATOL + RTOL * |oracle|
GRAD_RTOL = 1e-9                     # gradients: max |error| <= GRAD_RTOL * the largest component
NEAR_TIE = 1e-12                     # two ranked values this close (relative) may swap by rounding

LOGIT_GATES = ("softmax_of_selected_logits", "sigmoid_of_selected_logits")
FORMATS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MASK64 = (1 << 64) - 1


class Unsupported(Exception):
    """The oracle does not implement this configuration: the case is skipped, not passed."""


# ---- reading a case ------------------------------------------------------------------------------

def number(v):
    """JSON numbers, and moelab's json_number strings "nan", "inf", "-inf"."""
    return float(v) if isinstance(v, str) else v


def tensor(v, cols=None):
    """A float64 tensor from (nested) lists; an empty list becomes (0,) or (0, cols)."""
    if isinstance(v, list) and len(v) == 0:
        return torch.zeros(0) if cols is None else torch.zeros(0, cols)
    def convert(x):
        return [convert(y) for y in x] if isinstance(x, list) else number(x)
    return torch.tensor(convert(v), dtype=torch.float64)


def index_tensor(v, cols):
    return torch.zeros(0, cols, dtype=torch.long) if len(v) == 0 else torch.tensor(v, dtype=torch.long)


# ---- the router, the scores ----------------------------------------------------------------------

class RoundToFormat(torch.autograd.Function):
    """Rounds to bf16/fp16 through float32 (as moelab's emulation does: double -> float -> format,
    round to nearest even); the backward is the identity (straight-through, as mixed-precision
    training treats a cast)."""

    @staticmethod
    def forward(ctx, t, dtype):
        return t.to(torch.float32).to(dtype).to(torch.float64)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def router_logits(x, weight, bias, config):
    """logits = x W^T (+ b), as nn.Linear; in bf16/fp16, x, W, b and the logits are rounded."""
    router = config["router"]
    if router["noise"] != "none":
        raise Unsupported(f"router noise {router['noise']!r}: noise sampling is not oracle-checked "
                          f"(its gradient path is covered by test_routing's finite differences)")
    if router["dtype"] not in FORMATS:
        raise Unsupported(f"router dtype {router['dtype']!r}")
    dtype = FORMATS[router["dtype"]]
    if dtype is None:
        return F.linear(x, weight, bias)
    r = lambda t: None if t is None else RoundToFormat.apply(t, dtype)
    return r(F.linear(r(x), r(weight), r(bias)))


def expert_scores(logits, config):
    scoring = config["scoring"]
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    if scoring == "sqrt_softplus":
        # F.softplus returns l itself above `threshold` (default 20: an error of exp(-20) = 2e-9, far
        # above our tolerance); above 40, exp(-l) < 4e-18 is below half an ulp of l, so it is exact.
        return torch.sqrt(F.softplus(logits, threshold=40.0))
    raise Unsupported(f"scoring {scoring!r}")


# ---- selection -----------------------------------------------------------------------------------

def top_n(values, n):
    """Positions of the n largest of each row, best first, ties towards the lower position.
    torch.topk leaves the order of ties unspecified; a stable descending sort pins it."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :n]


def hash64(x):
    """SplitMix64's finaliser (moelab's reference/random.h hash64), with 64-bit wrap-around."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def expert_choice_capacity(tokens, experts, factor):
    """C = ceil(T * capacity_factor / E) in exact rational arithmetic, the factor read as the decimal
    it was written as (1.1 is 11/10, not 1.1000000000000000888), clamped to [0, T]."""
    return min(max(math.ceil(Fraction(tokens) * Fraction(repr(factor)) / experts), 0), tokens)


def select(logits, scores, selection_bias, token_ids, hash_table, config):
    """Returns (ids, stages): ids (T, k) expert ids, or (E, C) token ids for expert choice; stages the
    (values, n) rankings it made, for telling near-ties from disagreements."""
    kind = config["selection"]
    E, k = config["num_experts"], config["top_k"]
    T = logits.shape[0]
    if kind == "hash":  # Roller et al. 2021: expert = hash(token id) mod E
        seed = config["hash_seed"]
        return torch.tensor([[hash64(t ^ seed) % E] for t in token_ids], dtype=torch.long).reshape(T, 1), []
    if kind == "table":  # DeepSeek-V4's tid2eid: a fixed row of k experts per token id
        return hash_table[torch.tensor(token_ids, dtype=torch.long)].reshape(T, -1), []
    if kind == "expert_choice":  # Zhou et al. 2022: each expert takes its C best tokens
        capacity = expert_choice_capacity(T, E, config["capacity_factor"])
        per_expert = scores.T  # (E, T)
        return top_n(per_expert, capacity), [(per_expert, capacity)]
    # Token choice. Mixtral (mistral-src), gpt-oss and Llama 4 rank the router logits and then apply
    # softmax/sigmoid to the k chosen; the others rank the scores (+ the DeepSeek-V3 balancing bias).
    if config["gating"]["kind"] in LOGIT_GATES:
        if config["use_selection_bias"]:
            raise Unsupported("a selection bias with gates computed from the logits")
        ranked = logits
    else:
        ranked = scores + selection_bias if config["use_selection_bias"] else scores
    if kind == "topk":
        return top_n(ranked, k), [(ranked, k)]
    if kind == "group_limited":
        group = config["group"]
        G, kept, group_score, mask = group["n_group"], group["topk_group"], group["score"], group["mask"]
    elif kind == "device_limited":  # DeepSeek-V2: devices ranked by their best expert, the rest -inf
        devices = config["devices"]
        G, kept, group_score, mask = devices["num_devices"], devices["topk_devices"], "max", "neg_inf"
    else:
        raise Unsupported(f"selection {kind!r}")
    grouped = ranked.view(T, G, E // G)
    if group_score == "top2_sum":  # DeepSeek-V3: the sum of the group's two best
        scores_of_groups = grouped.topk(2, dim=-1).values.sum(dim=-1)
    elif group_score == "max":
        scores_of_groups = grouped.amax(dim=-1)
    else:
        raise Unsupported(f"group score {group_score!r}")
    kept_groups = top_n(scores_of_groups, kept)
    group_mask = torch.zeros(T, G, dtype=torch.bool).scatter_(1, kept_groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
    if mask not in ("neg_inf", "zero"):
        raise Unsupported(f"group mask {mask!r}")
    masked = ranked.masked_fill(~expert_mask, float("-inf") if mask == "neg_inf" else 0.0)
    return top_n(masked, k), [(scores_of_groups, kept), (masked, k)]


def near(a, b):
    """Whether a and b are within NEAR_TIE of each other (relative), or within 4 ulps where they are
    subnormal (there 1e-12 relative is less than one ulp). Equal values are near."""
    if a == b:
        return True
    scale = max(abs(a), abs(b))
    return abs(a - b) <= max(NEAR_TIE * scale, 4 * math.ulp(scale))


def explained_by_near_tie(stages, row, differing, other_stages=None, exact_counts=True):
    """Whether a disagreement in the choice of this row is a near-tie in `stages` (the oracle's
    rankings): every position that one side chose and the other did not has a value near the
    boundary value (the n-th largest). For group-limited routing the kept groups are compared first
    (other_stages: the rankings that led to the other choice), and a near-tie there explains any
    difference downstream. An exact tie explains nothing unless exact_counts: on identical values an
    exact tie must be broken towards the lower id by both."""
    def tied_at_boundary(values, n, positions):
        boundary = torch.sort(values, descending=True).values[n - 1].item()
        return all(near(values[p].item(), boundary) and (exact_counts or values[p].item() != boundary)
                   for p in positions)

    for depth, (values, n) in enumerate(stages[:-1]):  # the group (device) stage, if any
        if other_stages is None:
            break
        kept = set(top_n(values[row], n).tolist())
        kept_other = set(top_n(other_stages[depth][0][row], n).tolist())
        if kept != kept_other:
            return tied_at_boundary(values[row], n, kept ^ kept_other)
    values, n = stages[-1]
    return tied_at_boundary(values[row], n, differing)


# ---- gates, losses ------------------------------------------------------------------------------

def gates_of(logits, scores, ids, config):
    gating = config["gating"]
    if config["selection"] == "expert_choice":  # Zhou et al. eq. 1: the token's score for the expert
        raw = scores.T.gather(1, ids)
    elif gating["kind"] == "selected_scores":
        raw = scores.gather(1, ids)
    elif gating["kind"] == "softmax_of_selected_logits":
        raw = torch.softmax(logits.gather(1, ids), dim=-1)
    elif gating["kind"] == "sigmoid_of_selected_logits":
        raw = torch.sigmoid(logits.gather(1, ids))
    elif gating["kind"] == "ones":
        raw = torch.ones(ids.shape)
    else:
        raise Unsupported(f"gate kind {gating['kind']!r}")
    if gating["renormalize"]:
        raw = raw / (raw.sum(dim=-1, keepdim=True) + gating["renorm_eps"])
    return gating["routed_scaling_factor"] * raw


def balance_loss(logits, scores, ids, sequence_lengths, config):
    """The balance loss(es) of losses.h, coefficients applied; ids (T, k) are constants."""
    losses = config["losses"]
    kind, alpha = losses["aux_loss"], losses["aux_loss_coef"]
    T, k = ids.shape
    E = config["num_experts"]
    counts = F.one_hot(ids, E).sum(dim=(0, 1)).to(torch.float64)  # (E) token-expert pairs
    if kind == "none":
        return torch.zeros(())
    if kind == "switch":  # Fedus et al. eq. 4; f over the T*k assignments
        return alpha * E * torch.sum(counts / (T * k) * scores.mean(dim=0))
    if kind == "hugging_face":  # transformers' load_balancing_loss_func, one layer, no mask
        routing_weights = torch.softmax(logits, dim=-1)
        expert_mask = F.one_hot(ids, E).to(torch.float64)           # (T, k, E)
        tokens_per_expert = expert_mask.mean(dim=0)                   # (k, E)
        router_prob_per_expert = routing_weights.mean(dim=0)          # (E)
        return alpha * E * torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0))
    if kind == "megablocks":  # batched_load_balancing_loss, one layer
        scale = E * alpha / (1 * T * k)
        return scale * torch.sum(counts * scores.mean(dim=0))
    if kind == "deepseek_v2":  # DeepSeek-V2 eqs. 23-31
        f = E / (k * T) * counts
        P = scores.mean(dim=0)
        loss = alpha * torch.sum(f * P)
        if losses["device_loss_coef"] > 0 or losses["comm_loss_coef"] > 0:
            D, M = config["devices"]["num_devices"], config["devices"]["topk_devices"]
            P_device = P.view(D, -1).sum(dim=1)
            f_device = f.view(D, -1).mean(dim=1)
            loss = loss + losses["device_loss_coef"] * torch.sum(f_device * P_device)
            sent = F.one_hot(ids // (E // D), D).amax(dim=1).to(torch.float64)  # (T, D) token t reaches d
            f_comm = D / (M * T) * sent.sum(dim=0)
            loss = loss + losses["comm_loss_coef"] * torch.sum(f_comm * P_device)
        return loss
    if kind == "deepseek_v3_sequence":  # DeepSeek-V3 eqs. 17-20, averaged over the sequences
        lengths = sequence_lengths or [T]
        total, begin = torch.zeros(()), 0
        for length in lengths:
            s = scores[begin:begin + length]
            normalised = s / s.sum(dim=-1, keepdim=True)                 # eq. 19
            P = normalised.mean(dim=0)                                    # eq. 20
            f = E / (k * length) * F.one_hot(ids[begin:begin + length], E).sum(dim=(0, 1))  # eq. 18
            total = total + alpha * torch.sum(f * P)                      # eq. 17
            begin += length
        return total / len(lengths)
    raise Unsupported(f"aux_loss {kind!r}")


def z_loss(logits, config):  # ST-MoE eq. 5
    coef = config["losses"]["z_loss_coef"]
    return coef * torch.mean(torch.logsumexp(logits, dim=-1) ** 2) if coef > 0 else torch.zeros(())


# ---- comparison ---------------------------------------------------------------------------------

def where(shape, flat_index):
    if len(shape) == 0:
        return ""
    index = []
    for size in reversed(shape):
        index.append(flat_index % size)
        flat_index //= size
    return "[" + ",".join(str(i) for i in reversed(index)) + "]"


class Report:
    def __init__(self):
        self.failures = []     # messages
        self.ambiguous = []    # messages
        self.worst = (-1.0, "no values compared")  # (fraction of the tolerance, message)

    def fail(self, message):
        self.failures.append(message)

    def note_worst(self, fraction, message):
        if fraction > self.worst[0]:
            self.worst = (fraction, message)

    def shape(self, name, got, expected):
        if tuple(got.shape) != tuple(expected):
            self.fail(f"{name}: shape {tuple(got.shape)}, expected {tuple(expected)}")
            return False
        return True

    def close(self, name, got, want):
        """|got - want| <= ATOL + RTOL |want| elementwise; NaN never passes."""
        if not self.shape(name, got, want.shape):
            return
        got, want = got.detach(), want.detach()
        if got.numel() == 0:
            return
        error = (got - want).abs()
        bound = ATOL + RTOL * want.abs()
        fraction = torch.where(got == want, torch.zeros_like(error), error / bound)
        fraction = torch.where(torch.isnan(fraction) | torch.isnan(got) | torch.isnan(want),
                               torch.full_like(fraction, math.inf), fraction)
        i = int(torch.argmax(fraction.flatten()))
        f = fraction.flatten()[i].item()
        message = (f"{name}{where(got.shape, i)}: moelab {got.flatten()[i].item():.17g}, "
                   f"oracle {want.flatten()[i].item():.17g} ({f:.3g} of the tolerance)")
        self.note_worst(f, message)
        if not f <= 1.0:
            bad = int((fraction > 1).sum())
            self.fail(f"{message}; {bad} element(s) out of tolerance")

    def gradient(self, name, got, want):
        """max |got - want| <= GRAD_RTOL * max(|got|, |want|) over the tensor; NaN never passes."""
        if not self.shape(name, got, want.shape):
            return
        if got.numel() == 0:
            return
        if torch.isnan(got).any() or torch.isnan(want).any():
            self.fail(f"{name}: NaN (moelab {int(torch.isnan(got).sum())}, oracle {int(torch.isnan(want).sum())})")
            return
        error = (got - want).abs()
        scale = max(got.abs().max().item(), want.abs().max().item())
        i = int(torch.argmax(error.flatten()))
        relative = error.flatten()[i].item() / scale if scale > 0 else error.flatten()[i].item()
        f = relative / GRAD_RTOL
        message = (f"{name}{where(got.shape, i)}: moelab {got.flatten()[i].item():.17g}, "
                   f"oracle {want.flatten()[i].item():.17g}, error {relative:.3g} of the largest "
                   f"component ({f:.3g} of the tolerance)")
        self.note_worst(f, message)
        if not f <= 1.0:
            self.fail(message)


def check_ids(report, ids_moelab, own, on_moelab_values, per_row_name, id_name):
    """ids compared as sets per row (order-free). own = (ids, stages) from the oracle's own values;
    on_moelab_values = (ids, stages) of the oracle's selection run on moelab's own logits/scores,
    bitwise the values moelab ranked, where even exact ties must come out the same."""
    ids_own, stages_own = own
    ids_same_input, stages_same_input = on_moelab_values
    for row in range(ids_moelab.shape[0]):
        mine = set(ids_moelab[row].tolist())
        theirs = set(ids_own[row].tolist())
        if mine == theirs:
            continue
        described = f"ids: {per_row_name} {row}: moelab {id_name} {sorted(mine)}, oracle {sorted(theirs)}"
        same_input = set(ids_same_input[row].tolist())
        if mine == same_input:
            # The same choice on the same values: the two sets of values differ by rounding, and the
            # difference matters only if it flips a near-tie.
            if stages_own and explained_by_near_tie(stages_own, row, mine ^ theirs, stages_same_input):
                report.ambiguous.append(described + " (a near-tie at the boundary)")
            else:
                report.fail(described + "; no near-tie explains it, though on moelab's own values the "
                            "oracle chooses as moelab does")
        elif stages_same_input and explained_by_near_tie(stages_same_input, row, mine ^ same_input,
                                                         exact_counts=False):
            report.ambiguous.append(described + " (on moelab's values the choices differ at a near-tie)")
        else:
            report.fail(described + f"; on moelab's own values the oracle chooses {sorted(same_input)}")


def valid_ids(report, ids, rows, cols, limit, id_name):
    if not report.shape("ids", ids, (rows, cols)):
        return False
    if ids.numel() and (ids.min() < 0 or ids.max() >= limit):
        report.fail(f"ids: {id_name} outside [0, {limit})")
        return False
    for row in range(rows):
        if len(set(ids[row].tolist())) != cols:
            report.fail(f"ids[{row}]: {ids[row].tolist()} repeats an id")
            return False
    return True


# ---- one case -----------------------------------------------------------------------------------

def check_routing(case, config, report):
    """Recomputes the routing forward of a case (its x, weight, bias, selection_bias, token_ids,
    sequence_lengths, hash_table) under the routing configuration `config`, and compares moelab's
    logits, scores, ids, load, gates, aux_loss and z_loss. Returns a dict with the differentiable
    inputs (x, weight, bias), the oracle's logits, scores, gates, aux and z (computed with moelab's
    ids), moelab's ids and gates (moelab_gates) and the two selections (own, on_moelab: (ids,
    stages)); or None where nothing downstream can be checked (the failure is in the report).
    layer_oracle.py calls it too."""
    T, C, E = len(case["x"]), config["hidden_size"], config["num_experts"]
    expert_choice = config["selection"] == "expert_choice"

    x = tensor(case["x"], C).requires_grad_(True)
    weight = tensor(case["weight"], C).requires_grad_(True)
    bias = tensor(case["bias"]).requires_grad_(True) if config["router"]["use_bias"] else None
    selection_bias = tensor(case["selection_bias"]) if config["use_selection_bias"] else None
    token_ids = case["token_ids"]
    sequence_lengths = case["sequence_lengths"]
    hash_table = index_tensor(case["hash_table"], config["top_k"]) if "hash_table" in case else None
    if config["selection"] in ("hash", "table") and len(token_ids) != T:
        report.fail(f"token_ids: {len(token_ids)} ids for {T} tokens")
        return None

    moelab = {name: tensor(case[name], E) for name in ("logits", "scores")}
    moelab["gates"] = tensor(case["gates"])
    moelab_ids = index_tensor(case["ids"], 0)

    # Forward, independently.
    logits = router_logits(x, weight, bias, config)
    scores = expert_scores(logits, config)
    report.close("logits", moelab["logits"], logits)
    report.close("scores", moelab["scores"], scores)

    # Selection: on the oracle's values, and on moelab's (the same bits moelab ranked).
    with torch.no_grad():
        own = select(logits.detach(), scores.detach(), selection_bias, token_ids, hash_table, config)
        if tuple(moelab["logits"].shape) == (T, E) and tuple(moelab["scores"].shape) == (T, E):
            on_moelab = select(moelab["logits"], moelab["scores"], selection_bias, token_ids, hash_table, config)
        else:
            on_moelab = own
    rows, cols = own[0].shape
    limit, id_name, per_row = (T, "token ids", "expert") if expert_choice else (E, "expert ids", "token")
    if not valid_ids(report, moelab_ids, rows, cols, limit, id_name):
        return None
    check_ids(report, moelab_ids, own, on_moelab, per_row, id_name)

    # Everything downstream uses moelab's ids: equal to the oracle's as sets, or (ambiguous) an equally
    # valid choice at a near-tie, so that the gates, losses and gradients are checked either way.
    ids = moelab_ids
    if expert_choice:
        load = [cols] * E  # every expert takes exactly C tokens
    else:
        load = torch.bincount(ids.flatten(), minlength=E).tolist()
    if case["load"] != load:
        report.fail(f"load: moelab {case['load']}, oracle {load}")

    gates = gates_of(logits, scores, ids, config)
    report.close("gates", moelab["gates"], gates)
    if expert_choice or T == 0:  # expert choice is balanced by construction; nothing to balance
        aux, z = torch.zeros(()), torch.zeros(())
    else:
        aux = balance_loss(logits, scores, ids, sequence_lengths, config)
        z = z_loss(logits, config)
    report.close("aux_loss", torch.tensor(number(case["aux_loss"])), aux)
    report.close("z_loss", torch.tensor(number(case["z_loss"])), z)
    return {"x": x, "weight": weight, "bias": bias, "logits": logits, "scores": scores, "ids": ids,
            "gates": gates, "aux": aux, "z": z, "own": own, "on_moelab": on_moelab,
            "moelab_gates": moelab["gates"]}


def check_case(case):
    report = Report()
    if "unreadable" in case:
        report.fail(f"case file: {case['unreadable']}")
        return report
    config = case["config"]
    C = config["hidden_size"]
    routed = check_routing(case, config, report)
    if routed is None:
        return report
    x, weight, bias = routed["x"], routed["weight"], routed["bias"]
    gates, aux, z = routed["gates"], routed["aux"], routed["z"]

    # Backward: loss = sum(w * gates) + aux_loss + z_loss (route_backward with loss_scale 1).
    w = tensor(case["w"])
    if not report.shape("w", w, gates.shape):
        return report
    loss = torch.sum(w * gates) + aux + z
    inputs = [x, weight] + ([bias] if bias is not None else [])
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    else:  # e.g. hash routing with gates of 1 and no loss: nothing depends on the router
        grads = [torch.zeros_like(t) for t in inputs]
    report.gradient("dx", tensor(case["dx"], C), grads[0])
    report.gradient("dweight", tensor(case["dweight"], C), grads[1])
    if bias is not None:
        report.gradient("dbias", tensor(case["dbias"]), grads[2])
    elif len(case["dbias"]) != 0:
        report.fail(f"dbias: {len(case['dbias'])} values without a router bias")
    return report


def case_files(arguments):
    files = []
    for argument in arguments:
        path = pathlib.Path(argument)
        if path.is_dir():
            manifest = path / "manifest.json"
            if manifest.exists():
                files += [path / name for name in json.loads(manifest.read_text())["cases"]]
            else:
                files += sorted(p for p in path.glob("*.json") if p.name != "manifest.json")
        else:
            files.append(path)  # a missing or unreadable file fails, naming the error
    return files


def verdict(case, check=check_case):
    """("PASS" | "FAIL" | "AMBIGUOUS" | "SKIP", Report or the reason skipped). `check` is this
    file's check_case, or another oracle's (layer_oracle.py shares this driver)."""
    try:
        report = check(case)
    except Unsupported as reason:
        return "SKIP", str(reason)
    except Exception as error:  # a malformed case, or a bug here: a failure, never a pass
        report = Report()
        report.fail(f"the oracle could not check it: {error!r}")
    if report.failures:
        return "FAIL", report
    return ("AMBIGUOUS" if report.ambiguous else "PASS"), report


def run(files, check=check_case):
    counts = {"PASS": 0, "FAIL": 0, "AMBIGUOUS": 0, "SKIP": 0}
    width = max(len(f.stem) for f in files)
    for path in files:
        try:
            case = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            case = {"unreadable": repr(error)}  # check_case fails it, naming the error
        status, report = verdict(case, check)
        counts[status] += 1
        line = f"{status:<10} {path.stem:<{width}}  "
        if status == "SKIP":
            print(line + report)
            continue
        worst = f"worst {report.worst[1]}"
        if status == "FAIL":
            print(line + f"{len(report.failures)} check(s) failed; {worst}")
            for message in report.failures[:8]:
                print(f"           - {message}")
            if len(report.failures) > 8:
                print(f"           - ... and {len(report.failures) - 8} more")
        elif status == "AMBIGUOUS":
            print(line + f"{len(report.ambiguous)} near-tie(s), e.g. {report.ambiguous[0]}; {worst}")
        else:
            print(line + worst)
    summary = f"{counts['PASS']} passed, {counts['FAIL']} failed"
    if counts["SKIP"]:
        summary += f", {counts['SKIP']} skipped"
    if counts["AMBIGUOUS"]:
        summary += f", {counts['AMBIGUOUS']} ambiguous"
    print(summary)
    return 1 if counts["FAIL"] else 0


# ---- self-test: the oracle must fail wrong results -----------------------------------------------

def mutations(case):
    """(what, field, mutated case): small errors in moelab's outputs that the oracle must report as
    failures of `field`."""
    config = case["config"]
    out = []

    def mutate(what, field, change):
        mutated = copy.deepcopy(case)
        if change(mutated) is not False:
            out.append((what, field, mutated))

    def nudge(matrix, relative):  # the first element, by `relative` of max(1, |value|)
        value = number(matrix[0][0])
        matrix[0][0] = value + relative * max(1.0, abs(value))

    mutate("a logit off by 1e-9", "logits", lambda c: nudge(c["logits"], 1e-9))
    mutate("a score off by 1e-9", "scores", lambda c: nudge(c["scores"], 1e-9))
    mutate("a score is NaN", "scores", lambda c: c["scores"][0].__setitem__(0, "nan"))
    mutate("a gate off by 1e-9", "gates", lambda c: nudge(c["gates"], 1e-9))
    mutate("one more token for expert 0", "load", lambda c: c["load"].__setitem__(0, c["load"][0] + 1))
    mutate("the logits lose a column", "logits", lambda c: [row.pop() for row in c["logits"]])
    mutate("the aux loss off by 1e-6 relative", "aux_loss",
           lambda c: False if number(c["aux_loss"]) == 0 else
           c.__setitem__("aux_loss", number(c["aux_loss"]) * (1 + 1e-6)))
    mutate("the z-loss off by 1e-6 relative", "z_loss",
           lambda c: False if number(c["z_loss"]) == 0 else
           c.__setitem__("z_loss", number(c["z_loss"]) * (1 + 1e-6)))

    def nudge_gradient(c, name):  # one component, by 1e-8 of the largest
        scale = max((abs(number(v)) for row in c[name] for v in row), default=0.0)
        if scale == 0:
            return False
        c[name][0][0] = number(c[name][0][0]) + 1e-8 * scale
    mutate("a dweight component off by 1e-8 of the largest", "dweight", lambda c: nudge_gradient(c, "dweight"))
    mutate("a dx component off by 1e-8 of the largest", "dx", lambda c: nudge_gradient(c, "dx"))
    mutate("dx has a NaN", "dx", lambda c: c["dx"][0].__setitem__(0, "nan"))

    # An exact tie broken towards the higher id: find one on moelab's own values.
    if config["selection"] not in ("hash", "table"):
        logits, scores = tensor(case["logits"]), tensor(case["scores"])
        selection_bias = tensor(case["selection_bias"]) if config["use_selection_bias"] else None
        with torch.no_grad():
            _, stages = select(logits, scores, selection_bias, case["token_ids"], None, config)
        values, n = stages[-1]
        if n < values.shape[1]:
            order = torch.sort(values, dim=-1, descending=True, stable=True)
            for row in range(values.shape[0]):
                if order.values[row, n - 1] == order.values[row, n]:
                    lower, higher = order.indices[row, n - 1].item(), order.indices[row, n].item()
                    ids_row = case["ids"][row]
                    if lower in ids_row and higher not in ids_row:
                        mutate(f"the tie in row {row} broken towards the higher id", "ids",
                               lambda c: c["ids"][row].__setitem__(ids_row.index(lower), higher))
                        break
    return out


def self_test(files, check=check_case, make_mutations=mutations):
    """Every mutation of every case that passes must fail, in the field it changed."""
    caught = missed = 0
    ties = 0
    for path in files:
        case = json.loads(path.read_text())
        status, _ = verdict(case, check)
        if status not in ("PASS", "AMBIGUOUS"):
            print(f"self-test: {path.stem}: {status} as it is, so its mutations prove nothing; left out")
            continue
        for what, field, mutated in make_mutations(case):
            status, report = verdict(mutated, check)
            failed_fields = [m.split(":")[0].split("[")[0] for m in report.failures] if status == "FAIL" else []
            if field in failed_fields:
                caught += 1
                ties += field == "ids"
            else:
                missed += 1
                print(f"MISSED     {path.stem}: {what}: {status}"
                      + (f" ({'; '.join(report.failures)})" if failed_fields else ""))
    ties_caught = f" ({ties} of them exact ties broken the wrong way)" if ties else ""
    print(f"self-test: {caught} mutations caught{ties_caught}, {missed} missed")
    return 1 if missed or caught == 0 else 0


def main(arguments):
    if not arguments or arguments[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if arguments else 2
    testing_the_oracle = arguments[0] == "--self-test"
    files = case_files(arguments[1:] if testing_the_oracle else arguments)
    if not files:
        print(f"routing_oracle: no cases found in {' '.join(arguments)}")
        print("0 passed, 1 failed")
        return 1
    return self_test(files) if testing_the_oracle else run(files)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
