#!/usr/bin/python3
"""The independent oracle for moelab's whole MoE layer (reference/layer.h): every case that
moelab_dump_layer_cases wrote is recomputed here in PyTorch, in float64, from its inputs, its
parameters and its configuration alone, the way the published model code writes the block, and
compared with moelab's outputs and gradients. README.md (beside this file) says what is checked
and why the tolerances are what they are.

    /usr/bin/python3 layer_oracle.py CASES_DIR_OR_FILE...          (Debian's python3 with python3-torch)
    /usr/bin/python3 layer_oracle.py --self-test CASES_DIR_OR_FILE...

The routing (router, scores, selection, gates, balance losses) is routing_oracle.py's, imported;
this file adds capacity and dropping, the experts, the shared experts and their gate, where the
gate is applied, the combine, and the gradients of the whole block.

Prints one line per case (PASS / FAIL / AMBIGUOUS / SKIP) and a summary "N passed, M failed" (with
", K skipped" and ", A ambiguous" when there are any). Exits 1 if any case failed (or none was
found), 77 if torch cannot be imported (ctest's SKIP_RETURN_CODE), 0 otherwise.
"""

import copy
import math
import pathlib
import sys
from fractions import Fraction

try:
    import torch
    import torch.nn.functional as F
except Exception as error:  # ImportError, or a broken installation
    print(f"layer_oracle: SKIP: cannot import torch ({error!r}); run it with Debian's /usr/bin/python3 "
          f"and its python3-torch (tools/setup.sh installs it). This interpreter: {sys.executable}")
    sys.exit(77)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import routing_oracle as routing  # noqa: E402  (after the torch check, so that a skip names this file)
from routing_oracle import Report, Unsupported, index_tensor, near, number, tensor  # noqa: E402

torch.set_default_dtype(torch.float64)

# Tolerances: routing_oracle's (ATOL + RTOL |oracle| for forward values, GRAD_RTOL of the largest
# component for gradients), for the same reason. Both sides evaluate the same float64 formulas in
# another order; the layer adds two 16- or 32-term dot products (up and down projections), an
# activation and a sum over at most k + shared experts to each output, a few dozen roundings of
# 2^-53 more, so y agrees to ~1e-14 relative and its near-zero values (cancellation between
# experts) to ~1e-14 absolute (|terms| < 100 here). The gradients pass back through the same chains
# plus the routing's. Any real error (a wrong activation, a dropped pair counted, a missing gate)
# is many orders of magnitude larger.
PARAMETERS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
GATED = ("swiglu", "swiglu_clamped")


# ---- the experts ---------------------------------------------------------------------------------

def expert_shapes(expert_config, hidden, intermediate):
    """{parameter: shape, or None where the configuration has no such parameter}, as nn.Linear
    weights (out, in)."""
    activation, bias = expert_config["activation"], expert_config["use_bias"]
    gated = activation in GATED
    C, H = hidden, intermediate
    return {"w_gate": (H, C) if gated else None, "w_up": (H, C), "w_down": (C, H),
            "b_gate": (H,) if gated and bias else None, "b_up": (H,) if bias else None,
            "b_down": (C,) if bias else None}


def read_expert(values, shapes, name):
    """An expert's parameters as leaf tensors that require grad. A malformed case raises (and the
    case fails, naming it)."""
    params = {}
    for key in PARAMETERS:
        shape = shapes[key]
        if shape is None:
            if len(values[key]) != 0:
                raise ValueError(f"{name}.{key} is given, but this activation / bias setting has none")
            continue
        t = tensor(values[key], shape[1] if len(shape) == 2 else None)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}.{key} has shape {tuple(t.shape)}, expected {shape}")
        params[key] = t.requires_grad_(True)
    return params


def gpt_oss_hidden(x, p, expert_config):
    """gpt-oss (Hugging Face's GptOssExperts): one fused projection gate_up_proj (C, 2H) whose even
    columns are the gate and odd columns the up projection; the gate clamped above at `limit`, the
    up to [-limit, limit]; glu = gate * sigmoid(alpha * gate); hidden = (up + 1) * glu. The fused
    matrix is assembled from w_gate and w_up here and sliced back the way that code slices it."""
    limit, alpha = expert_config["swiglu_limit"], expert_config["swiglu_alpha"]
    H, C = p["w_up"].shape
    gate_up_proj = torch.stack((p["w_gate"].T, p["w_up"].T), dim=-1).reshape(C, 2 * H)
    gate_up = x @ gate_up_proj
    if "b_up" in p:
        gate_up = gate_up + torch.stack((p["b_gate"], p["b_up"]), dim=-1).reshape(2 * H)
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


def ffn(x, p, expert_config):
    """One expert on its rows x (n, C)."""
    activation = expert_config["activation"]
    if activation == "swiglu":  # Mixtral's w2(silu(w1 x) * w3 x); Llama, Qwen, DeepSeek, OLMoE alike
        h = F.silu(F.linear(x, p["w_gate"], p.get("b_gate"))) * F.linear(x, p["w_up"], p.get("b_up"))
    elif activation == "gelu":  # exact GELU (erf), nn.GELU()'s default
        h = F.gelu(F.linear(x, p["w_up"], p.get("b_up")), approximate="none")
    elif activation == "relu":  # T5 / Switch DenseReluDense: wo(relu(wi x))
        h = F.relu(F.linear(x, p["w_up"], p.get("b_up")))
    elif activation == "swiglu_clamped":
        h = gpt_oss_hidden(x, p, expert_config)
    else:
        raise Unsupported(f"activation {activation!r}")
    return F.linear(h, p["w_down"], p.get("b_down"))


# ---- capacity and dropping -----------------------------------------------------------------------

def expert_capacity(T, k, E, capacity_config):
    """capacity = round(capacity_factor * T * k / E), in exact rational arithmetic with the factor
    read as the decimal it was written as (1.1 is 11/10), rounded up (ceil) or down (floor,
    trunc_int: the same for a quotient >= 0), at least min_capacity, at most T * k."""
    quotient = Fraction(repr(capacity_config["capacity_factor"])) * T * k / E
    rounding = capacity_config["rounding"]
    if rounding == "ceil":
        capacity = math.ceil(quotient)
    elif rounding in ("floor", "trunc_int"):
        capacity = math.floor(quotient)
    else:
        raise Unsupported(f"capacity rounding {rounding!r}")
    return min(max(capacity, capacity_config["min_capacity"]), T * k)


def kept_in_order(slots, capacity, E):
    """GShard's Algorithm 1 (and Mesh TensorFlow's top-2 gating), for any k: slots (T, k) holds each
    token's experts best first, tokens in the order they are served. Slot j's position in its
    expert's buffer is the cumulative count of slot j's one-hot masks over the tokens before it, after
    everything that the earlier slots kept; a pair is kept where its position is < capacity.
    Returns kept (T, k) bool, in the rows' order."""
    T, k = slots.shape
    filled = torch.zeros(E, dtype=torch.long)        # pairs each expert has kept so far
    kept = torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        mask = F.one_hot(slots[:, j], E)             # (T, E)
        position = torch.cumsum(mask, dim=0) - 1 + filled
        kept_mask = mask * (position < capacity)
        kept[:, j] = kept_mask.sum(dim=1) > 0
        filled = filled + kept_mask.sum(dim=0)
    return kept


def slot_order(ids, selection):
    """Each token's experts (moelab's ids, as a set) best first: ranked by the values the selection
    ranked (logits, or scores + bias, masked for group-limited routing), ties towards the lower id;
    for hash and table routing in the order the oracle's own choice gives (the table's row)."""
    chosen, stages = selection
    rows = []
    for t in range(ids.shape[0]):
        mine = ids[t].tolist()
        if stages:
            values = stages[-1][0][t]
            rows.append(sorted(mine, key=lambda e: (-values[e].item(), e)))
        else:
            theirs = chosen[t].tolist()
            rows.append(theirs if set(theirs) == set(mine) else mine)
    return rows


def token_order(priority, policy):
    """The order in which tokens offer their pairs: arrival (sequence) order, or Batch Prioritized
    Routing (Riquelme et al. 2021): by the token's largest gate, descending, ties to the lower id."""
    T = priority.shape[0]
    if policy == "arrival_order":
        return list(range(T))
    if policy == "gate_priority":
        return torch.sort(priority, descending=True, stable=True).indices.tolist()
    raise Unsupported(f"drop policy {policy!r}")


def keep_of(ids, slots, order, capacity, E):
    """keep (T, k) bool in moelab's layout (keep[t, j] for pair (t, ids[t, j])), from each token's
    experts best first (slots) and the order of the tokens."""
    T, k = ids.shape
    if capacity is None or T == 0:
        return torch.ones(T, k, dtype=torch.bool)
    served = torch.tensor([slots[t] for t in order], dtype=torch.long).reshape(T, k)
    kept = kept_in_order(served, capacity, E)
    kept_pairs = {(t, served[i, j].item()) for i, t in enumerate(order) for j in range(k) if kept[i, j]}
    return torch.tensor([[(t, ids[t, j].item()) in kept_pairs for j in range(k)] for t in range(T)],
                        dtype=torch.bool).reshape(T, k)


def differs_only_at_near_ties(order_a, order_b, values):
    """Whether two orders of the same items disagree only on pairs whose values are near-equal."""
    position = {item: i for i, item in enumerate(order_b)}
    for i, a in enumerate(order_a):
        for b in order_a[i + 1:]:
            if position[a] > position[b] and not near(values[a], values[b]):
                return False
    return True


def check_capacity(report, case, config, routed):
    """Compares moelab's capacity, keep and dropped; returns the keep (T, k) the block uses (the
    oracle's, computed on the very values moelab ranked and sorted)."""
    rc, capacity_config = config["routing"], config["capacity"]
    ids, gates = routed["ids"], routed["gates"].detach()
    T, k = ids.shape
    E = rc["num_experts"]
    capacity = None if capacity_config["dropless"] else expert_capacity(T, k, E, capacity_config)
    if case["capacity"] != capacity:
        report.fail(f"capacity: moelab {case['capacity']}, oracle {capacity}")

    # On moelab's own values (its logits / scores ranked the slots, its gates ordered the tokens)
    # the pairs kept must be exactly the same; on the oracle's own values they may differ only where
    # a near-tie decided the order.
    moelab_gates = routed["moelab_gates"]
    priority_m = (moelab_gates if moelab_gates.shape == gates.shape else gates).amax(dim=1)
    priority_o = gates.amax(dim=1)
    slots_m, slots_o = slot_order(ids, routed["on_moelab"]), slot_order(ids, routed["own"])
    order_m = token_order(priority_m, capacity_config["policy"]) if capacity is not None else []
    order_o = token_order(priority_o, capacity_config["policy"]) if capacity is not None else []
    keep = keep_of(ids, slots_m, order_m, capacity, E)
    keep_own = keep_of(ids, slots_o, order_o, capacity, E)

    moelab_keep = index_tensor(case["keep"], k)
    if report.shape("keep", moelab_keep, (T, k)):
        wrong = (moelab_keep != keep.long()).nonzero().tolist()
        for t, j in wrong[:4]:
            report.fail(f"keep[{t},{j}]: moelab {moelab_keep[t, j].item()}, oracle {int(keep[t, j])} "
                        f"(token {t} -> expert {ids[t, j].item()}, capacity {capacity}); "
                        f"{len(wrong)} pair(s) differ")
    if not torch.equal(keep, keep_own):
        values = routed["own"][1][-1][0] if routed["own"][1] else None
        explained = differs_only_at_near_ties(order_m, order_o, priority_o.tolist()) and all(
            values is None or differs_only_at_near_ties(slots_m[t], slots_o[t], values[t].tolist())
            for t in range(T))
        message = "keep: on the oracle's own values other pairs are kept"
        if explained:
            report.ambiguous.append(message + " (a near-tie in the slot or token order)")
        else:
            report.fail(message + "; no near-tie explains it")

    dropped = torch.bincount(ids[~keep], minlength=E).tolist() if T else [0] * E
    if case["dropped"] != dropped:
        report.fail(f"dropped: moelab {case['dropped']}, oracle {dropped}")
    return keep


# ---- the block -----------------------------------------------------------------------------------

def routed_experts(x, ids, gates, keep, experts, expert_config, placement, expert_choice):
    """sum over each token's kept pairs of gate * expert(x), a loop over the experts with
    index_add_ as Hugging Face's Mixtral / Qwen2-MoE / OLMoE / DeepSeek blocks write it. Llama 4
    scales the expert's input instead (routed_in = x * sigmoid score; its dense loop over all experts
    gives the unchosen ones a zero input, whose SwiGLU output is exactly zero, so the sparse loop is
    the same function)."""
    E = len(experts)
    y = torch.zeros_like(x)
    if expert_choice:  # Zhou et al. 2022: expert e takes tokens ids[e] with gates gates[e]
        rows = [(ids[e], gates[e]) for e in range(E)]
    else:
        expert_mask = (F.one_hot(ids, E) * keep.unsqueeze(-1)).permute(2, 1, 0)  # (E, k, T)
        rows = []
        for e in range(E):
            slot, token = torch.where(expert_mask[e])
            rows.append((token, gates[token, slot]))
    for e, (token, gate) in enumerate(rows):
        if token.numel() == 0:
            continue
        state = x[token]
        if placement == "input":
            out = ffn(state * gate[:, None], experts[e], expert_config)
        elif placement == "output":
            out = ffn(state, experts[e], expert_config) * gate[:, None]
        else:
            raise Unsupported(f"gate placement {placement!r}")
        y.index_add_(0, token, out)
    return y


def shared_experts(x, shared, shared_config, shared_gate):
    """Always-active experts, summed (DeepSeek, Llama 4); Qwen2-MoE scales them per token by
    sigmoid(shared_expert_gate(x)), an nn.Linear(C, 1, bias=False)."""
    out = torch.zeros_like(x)
    for p in shared:
        out = out + ffn(x, p, shared_config)
    if shared_gate is not None:
        out = torch.sigmoid(F.linear(x, shared_gate)) * out
    return out


def compute_block(case, config, routed, keep):
    """The block's output and every parameter leaf: y (T, C) and {name: leaf}."""
    rc = config["routing"]
    C, E = rc["hidden_size"], rc["num_experts"]
    expert_config, shared = config["expert"], config["shared"]
    if expert_config["hidden_size"] != C:
        raise ValueError(f"expert hidden_size {expert_config['hidden_size']} != router hidden_size {C}")
    if len(case["experts"]) != E or len(case["shared"]) != shared["count"]:
        raise ValueError(f"{len(case['experts'])} experts and {len(case['shared'])} shared experts for "
                         f"num_experts = {E}, shared count = {shared['count']}")
    shapes = expert_shapes(expert_config, C, expert_config["intermediate_size"])
    experts = [read_expert(p, shapes, f"experts.{e}") for e, p in enumerate(case["experts"])]
    shared_config = dict(expert_config, intermediate_size=shared["intermediate_size"])
    shared_shapes = expert_shapes(shared_config, C, shared["intermediate_size"])
    shared_params = [read_expert(p, shared_shapes, f"shared.{s}") for s, p in enumerate(case["shared"])]
    shared_gate = None
    if shared["gated"]:
        shared_gate = tensor(case["shared_gate"], C).requires_grad_(True)
        if tuple(shared_gate.shape) != (1, C):
            raise ValueError(f"shared_gate has shape {tuple(shared_gate.shape)}, expected (1, {C})")

    x = routed["x"]
    y = routed_experts(x, routed["ids"], routed["gates"], keep, experts, expert_config,
                       config["gate_placement"], rc["selection"] == "expert_choice")
    y = y + shared_experts(x, shared_params, shared_config, shared_gate)

    leaves = {"dx": x, "dweight": routed["weight"]}
    if routed["bias"] is not None:
        leaves["dbias"] = routed["bias"]
    for prefix, params in (("d_experts", experts), ("d_shared", shared_params)):
        for i, p in enumerate(params):
            for key, leaf in p.items():
                leaves[f"{prefix}.{i}.{key}"] = leaf
    if shared_gate is not None:
        leaves["d_shared_gate"] = shared_gate
    return y, leaves, shapes, shared_shapes


def moelab_gradient(case, name, shape):
    """moelab's gradient `name` ("dx", "d_experts.3.w_up", ...) as a tensor."""
    parts = name.split(".")
    value = case[parts[0]]
    if len(parts) == 3:
        value = value[int(parts[1])][parts[2]]
    return tensor(value, shape[1] if len(shape) == 2 else None)


def check_case(case):
    report = Report()
    if "unreadable" in case:
        report.fail(f"case file: {case['unreadable']}")
        return report
    config = case["config"]
    rc = config["routing"]
    T, C, E = len(case["x"]), rc["hidden_size"], rc["num_experts"]
    expert_choice = rc["selection"] == "expert_choice"
    if expert_choice and not config["capacity"]["dropless"]:
        raise Unsupported("token dropping on an expert-choice layer (moelab rejects it)")

    routed = routing.check_routing(case, rc, report)  # logits ... z_loss, compared
    if routed is None:
        return report

    if expert_choice:  # its capacity is built into the selection: nothing is dropped
        keep = None
        if case["capacity"] is not None or len(case["keep"]) != 0:
            report.fail(f"keep: an expert-choice layer has no capacity stage, yet moelab reports "
                        f"capacity {case['capacity']} and keep {case['keep'][:2]}")
        if case["dropped"] != [0] * E:
            report.fail(f"dropped: moelab {case['dropped']} on an expert-choice layer, oracle {[0] * E}")
    else:
        keep = check_capacity(report, case, config, routed)

    y, leaves, shapes, shared_shapes = compute_block(case, config, routed, keep)
    report.close("y", tensor(case["y"], C), y)

    # Backward: loss = sum(dy * y) + aux_loss + z_loss (moe_layer_backward with loss_scale 1).
    dy = tensor(case["dy"], C)
    if not report.shape("dy", dy, (T, C)):
        return report
    loss = torch.sum(dy * y) + routed["aux"] + routed["z"]
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    for name, grad in zip(names, grads):
        want = torch.zeros_like(leaves[name]) if grad is None else grad  # e.g. an expert nobody chose
        report.gradient(name, moelab_gradient(case, name, tuple(want.shape)), want)

    # Gradients of parameters the layer does not have must be absent.
    if routed["bias"] is None and len(case["dbias"]) != 0:
        report.fail(f"dbias: {len(case['dbias'])} values without a router bias")
    if "d_shared_gate" not in leaves and len(case["d_shared_gate"]) != 0:
        report.fail("d_shared_gate: given without a shared gate")
    for prefix, count, param_shapes in (("d_experts", E, shapes),
                                        ("d_shared", config["shared"]["count"], shared_shapes)):
        if len(case[prefix]) != count:
            report.fail(f"{prefix}: {len(case[prefix])} experts' gradients, expected {count}")
            continue
        for i in range(count):
            for key in PARAMETERS:
                if param_shapes[key] is None and len(case[prefix][i][key]) != 0:
                    report.fail(f"{prefix}.{i}.{key}: given, but the expert has no {key}")
    return report


# ---- self-test: the oracle must fail wrong results -----------------------------------------------

def mutations(case):
    """(what, field, mutated case): small errors in moelab's outputs that the oracle must report as
    failures of `field`. Only the changed top-level entry is copied."""
    out = []

    def mutate(what, field, key, change):
        mutated = dict(case)
        mutated[key] = copy.deepcopy(case[key])
        if change(mutated) is not False:
            out.append((what, field, mutated))

    def largest(rows):
        return max((abs(number(v)) for row in rows for v in (row if isinstance(row, list) else [row])),
                   default=0.0)

    def nudge_gradient(rows):  # one component, by 1e-8 of the largest (1e-8 / GRAD_RTOL = 10 tolerances)
        scale = largest(rows)
        if scale == 0:
            return False
        if isinstance(rows[0], list):
            rows[0][0] = number(rows[0][0]) + 1e-8 * scale
        else:
            rows[0] = number(rows[0]) + 1e-8 * scale

    def nudge_y(c):  # an output element, by 1e-9 relative (10 tolerances)
        value = number(c["y"][0][0])
        c["y"][0][0] = value + 1e-9 * max(1.0, abs(value))

    mutate("an element of y off by 1e-9 relative", "y", "y", nudge_y)
    mutate("y has a NaN", "y", "y", lambda c: c["y"][1].__setitem__(2, "nan"))
    mutate("a gate off by 1e-9", "gates", "gates",
           lambda c: c["gates"][0].__setitem__(0, number(c["gates"][0][0]) + 1e-9))
    mutate("a dx component off by 1e-8 of the largest", "dx", "dx", lambda c: nudge_gradient(c["dx"]))
    mutate("a dweight component off by 1e-8 of the largest", "dweight", "dweight",
           lambda c: nudge_gradient(c["dweight"]))
    if len(case["dbias"]):
        mutate("a dbias component off by 1e-8 of the largest", "dbias", "dbias",
               lambda c: nudge_gradient(c["dbias"]))
    if len(case["d_shared_gate"]):
        mutate("a shared-gate gradient component off by 1e-8 of the largest", "d_shared_gate", "d_shared_gate",
               lambda c: nudge_gradient(c["d_shared_gate"]))
    for prefix in ("d_experts", "d_shared"):
        # the first expert with a non-zero gradient: its down projection, and its first bias if any
        for i, grads in enumerate(case[prefix]):
            if largest(grads["w_down"]) > 0:
                for key in ("w_down", "w_gate" if len(grads["w_gate"]) else "w_up", "b_up"):
                    if len(grads[key]):
                        mutate(f"{prefix}.{i}.{key}: a component off by 1e-8 of the largest",
                               f"{prefix}.{i}.{key}", prefix,
                               lambda c, i=i, key=key: nudge_gradient(c[prefix][i][key]))
                break

    # Dropping: a kept pair reported dropped, a dropped pair reported kept (keep and dropped changed
    # together, consistently), a drop count alone, and y as if a dropped pair had been kept.
    keep, ids = case["keep"], case["ids"]
    pairs = [(t, j) for t in range(len(keep)) for j in range(len(keep[t]))]
    kept = [(t, j) for t, j in pairs if keep[t][j] == 1]
    dropped = [(t, j) for t, j in pairs if keep[t][j] == 0]

    def flip(c, t, j, to):
        c["keep"] = copy.deepcopy(case["keep"])
        c["keep"][t][j] = to
        c["dropped"][ids[t][j]] += 1 if to == 0 else -1

    if kept:
        t, j = kept[len(kept) // 2]
        mutate(f"the kept pair (token {t}, expert {ids[t][j]}) reported dropped", "keep", "dropped",
               lambda c: flip(c, t, j, 0))
        mutate(f"one more pair dropped by expert {ids[t][j]} (keep unchanged)", "dropped", "dropped",
               lambda c: c["dropped"].__setitem__(ids[t][j], c["dropped"][ids[t][j]] + 1))
    if dropped:
        t, j = dropped[0]
        mutate(f"the dropped pair (token {t}, expert {ids[t][j]}) reported kept", "keep", "dropped",
               lambda c: flip(c, t, j, 1))
        mutate(f"y as if the dropped pair (token {t}, expert {ids[t][j]}) had been kept", "y", "y",
               lambda c: add_pair_output(c, case, t, j))
    if case["capacity"] is not None:
        mutate("the capacity one more", "capacity", "capacity", lambda c: c.__setitem__("capacity", c["capacity"] + 1))
    return out


def add_pair_output(mutated, case, t, j):
    """y[t] += the pair's contribution, as moelab would give it had it kept the pair."""
    config = case["config"]
    C = config["routing"]["hidden_size"]
    expert_config = config["expert"]
    shapes = expert_shapes(expert_config, C, expert_config["intermediate_size"])
    e = case["ids"][t][j]
    params = read_expert(case["experts"][e], shapes, f"experts.{e}")
    x = tensor(case["x"], C)[t:t + 1]
    gate = number(case["gates"][t][j])
    with torch.no_grad():
        if config["gate_placement"] == "input":
            contribution = ffn(x * gate, params, expert_config)[0]
        else:
            contribution = gate * ffn(x, params, expert_config)[0]
    mutated["y"][t] = [number(v) + c for v, c in zip(mutated["y"][t], contribution.tolist())]


def main(arguments):
    if not arguments or arguments[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if arguments else 2
    testing_the_oracle = arguments[0] == "--self-test"
    files = routing.case_files(arguments[1:] if testing_the_oracle else arguments)
    if not files:
        print(f"layer_oracle: no cases found in {' '.join(arguments)}")
        print("0 passed, 1 failed")
        return 1
    if testing_the_oracle:
        return routing.self_test(files, check=check_case, make_mutations=mutations)
    return routing.run(files, check=check_case)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
