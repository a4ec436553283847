#!/usr/bin/python3
"""The independent oracle for moelab's golden values: every case of a golden set (`moelab golden
--out DIR`, format docs/golden.md) is recomputed here in PyTorch, in float64, from its inputs, its
parameters and its manifest configuration alone, and compared with its expected values.

    /usr/bin/python3 tests/golden/golden_oracle.py GOLDEN_DIR [--filter GLOB]
    /usr/bin/python3 tests/golden/golden_oracle.py --self-test GOLDEN_DIR [--filter GLOB]

Routing and layer cases (every preset, the adversarial.* ones) are handed to the project's oracles,
tests/oracle/routing_oracle.py and layer_oracle.py, as the case dicts they read: the golden's
expected tensors play the role of "moelab's outputs". The component cases (numerics, losses,
balancing, capacity, dispatch, combine, experts, shared_experts) are recomputed by the small
functions below, each citing its formula. Two verdicts per case:

  oracle  the oracles' own comparison (tests/oracle/README.md): float64 against float64, so
          |golden - oracle| <= 1e-12 + 1e-10 |oracle| for values, 1e-9 of the largest component for
          gradients, ids as sets with the near-tie rule, integers and bits exact;
  golden  the oracle's values checked against the golden values with the case's own checks
          (moelab_golden.compare, exactly as a kernel is checked): the worst
          |oracle - golden| / (atol + rtol |golden|) over its allclose checks must be <= 1.

Prints one line per case (PASS / FAIL / AMBIGUOUS / SKIP, with the worst fraction of each
tolerance) and a summary; exits 1 if any case failed (or none was found), 77 if torch cannot be
imported (ctest's SKIP_RETURN_CODE), 0 otherwise. --self-test changes golden expected values in
memory (an element of output.y beyond its tolerance, an id swapped far from any tie, one bit of an
encoding, ...) and exits non-zero unless every change makes its case FAIL, naming that tensor.
"""

import argparse
import dataclasses
import math
import pathlib
import sys
from collections import Counter
from fractions import Fraction

try:
    import torch
    import torch.nn.functional as F
except Exception as error:  # ImportError, or a broken installation
    print(f"golden_oracle: SKIP: cannot import torch ({error!r}); run it with Debian's /usr/bin/python3 "
          f"and its python3-torch (tools/setup.sh installs it). This interpreter: {sys.executable}")
    sys.exit(77)

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "golden"))
sys.path.insert(0, str(ROOT / "tests" / "oracle"))
import moelab_golden as mg  # noqa: E402
import layer_oracle as layer  # noqa: E402
import routing_oracle as routing  # noqa: E402
from routing_oracle import Report, Unsupported  # noqa: E402

torch.set_default_dtype(torch.float64)


# ---- small helpers --------------------------------------------------------------------------------

def t64(a):
    """A golden numpy array as a float64 tensor (inputs are decoded exactly: bf16/fp8 -> float32)."""
    return torch.from_numpy(np.array(a, dtype=np.float64))


def long(a):
    return torch.from_numpy(np.array(a, dtype=np.int64))


def values(a):
    """Nested Python lists of floats, as the oracles read them from JSON."""
    return np.asarray(a, dtype=np.float64).tolist()


def ints(a):
    return np.asarray(a, dtype=np.int64).tolist()


def exact(report, name, golden, mine):
    """Integers (ids, counts, keep masks): every element equal."""
    golden, mine = np.asarray(golden), np.asarray(mine)
    if golden.shape != mine.shape:
        report.fail(f"{name}: shape {list(golden.shape)}, oracle {list(mine.shape)}")
    elif not np.array_equal(golden, mine):
        where = tuple(int(i) for i in np.argwhere(golden != mine)[0])
        report.fail(f"{name}{list(where)}: golden {golden[where]}, oracle {mine[where]}; "
                    f"{int((golden != mine).sum())} element(s) differ")


def gradients(report, case, loss, leaves):
    """d loss / d leaf for every leaf (golden name -> tensor), compared with the golden gradients
    (routing_oracle's Report.gradient); an expert nobody chose has zero gradients. Every grad.*
    tensor of the case must be one of the leaves."""
    names = list(leaves)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    else:  # e.g. hash routing with gates of 1 and no loss: nothing depends on the router
        grads = [None] * len(names)
    produced = {}
    for name, grad in zip(names, grads):
        grad = torch.zeros_like(leaves[name]) if grad is None else grad
        produced[name] = grad.detach().numpy()
        if name not in case.expected:
            report.fail(f"{name}: the oracle differentiates it, the golden case has no such tensor")
            continue
        report.gradient(name, t64(case.expected[name]), grad)
    for name in case.expected:
        if name.startswith("grad.") and name not in leaves:
            report.fail(f"{name}: the golden case has it, but it is a gradient of nothing the layer has")
    return produced


# ---- routing and whole layers: the project's oracles ----------------------------------------------

IDS, EC_IDS = "output.topk_ids", "output.expert_choice_ids"
# Golden tensor <- the oracles' field of the same meaning (used to name failures in the self-test).
ORACLE_FIELDS = {"logits": "output.logits", "scores": "output.scores", "gates": "output.gates",
                 "load": "output.load", "aux_loss": "output.aux_loss", "z_loss": "output.z_loss",
                 "keep": "output.keep", "dropped": "output.dropped", "y": "output.y",
                 "ranking": "output.ranking", "counts": "output.counts", "offsets": "output.offsets",
                 "row_token": "output.row_token", "expert_out": "output.expert_out"}


def routing_config(case):
    return case.config["routing"] if case.entry.get("component") == "layer" else case.config


def expert_params(tensors, prefix, count):
    """[{w_gate: ..., ..., b_down: ...}] with [] for the parameters a layer does not have."""
    return [{p: values(tensors.get(f"{prefix}.{i}.{p}", [])) for p in layer.PARAMETERS} for i in range(count)]


def oracle_case(case):
    """The golden case as the dict routing_oracle / layer_oracle read (tests/oracle/README.md); the
    golden's expected values are in the place of moelab's outputs."""
    rc = routing_config(case)
    inp, exp = case.inputs, case.expected
    ec = rc["selection"] == "expert_choice"
    c = {"config": case.config,
         "x": values(inp["input.x"]),
         "weight": values(inp["param.router.weight"]),
         "bias": values(inp.get("param.router.bias", [])),
         "selection_bias": values(inp.get("param.selection_bias", [])),
         "token_ids": ints(inp.get("input.token_ids", [])),
         "sequence_lengths": ints(inp.get("input.sequence_lengths", [])),
         "logits": values(exp["output.logits"]),
         "scores": values(exp["output.scores"]),
         "ids": ints(exp[EC_IDS if ec else IDS]),
         "gates": values(exp["output.gates"]),
         "load": ints(exp["output.load"]),
         # Absent where the configuration has no such loss; the oracle then computes exactly 0.
         "aux_loss": float(exp.get("output.aux_loss", 0.0)),
         "z_loss": float(exp.get("output.z_loss", 0.0))}
    if rc["selection"] == "table":
        if "hash_table" not in rc:
            raise Unsupported("table selection without the table in the configuration")
        c["hash_table"] = rc["hash_table"]
    if case.entry.get("component") != "layer":
        return c
    config = case.config
    T, k, E = len(c["x"]), rc["top_k"], rc["num_experts"]
    c["experts"] = expert_params(inp, "param.experts", E)
    c["shared"] = expert_params(inp, "param.shared", config["shared"]["count"])
    c["shared_gate"] = values(inp.get("param.shared_gate", []))
    c["y"] = values(exp["output.y"])
    if ec or config["capacity"]["dropless"]:
        # No capacity stage (the golden case stores no keep): every pair kept, as moelab defines it.
        c["capacity"], c["keep"], c["dropped"] = None, [] if ec else [[1] * k for _ in range(T)], [0] * E
    else:
        # The capacity is not stored: it follows from the configuration (layer_oracle's formula).
        c["capacity"] = layer.expert_capacity(T, k, E, config["capacity"])
        c["keep"], c["dropped"] = ints(exp["output.keep"]), ints(exp["output.dropped"])
    return c


def routing_outputs(case, c, routed, report):
    """The oracle's routing outputs under the golden names; also checks output.ranking (the values
    the selection ranked, stored for kernel authors' near-tie decisions)."""
    rc = routing_config(case)
    ec = rc["selection"] == "expert_choice"
    golden_ids, own_ids = routed["ids"], routed["own"][0]
    # The oracle's own choice, as sets per row; where a set equals the golden's, in the golden's
    # order, since the oracle's gates (computed with the golden ids, as the oracles do) follow it.
    ids = golden_ids.clone()
    for row in range(ids.shape[0]):
        if set(own_ids[row].tolist()) != set(golden_ids[row].tolist()):
            ids[row] = own_ids[row]
    if "output.ranking" in case.expected:
        if rc["gating"]["kind"] in routing.LOGIT_GATES:
            ranked = routed["logits"]
        elif rc["use_selection_bias"]:
            ranked = routed["scores"] + routing.tensor(c["selection_bias"])
        else:
            ranked = routed["scores"]
        report.close("ranking", t64(case.expected["output.ranking"]), ranked)
    E = rc["num_experts"]
    load = [ids.shape[1]] * E if ec else torch.bincount(ids.flatten(), minlength=E).tolist()
    return {"output.logits": routed["logits"].detach().numpy(),
            "output.scores": routed["scores"].detach().numpy(),
            EC_IDS if ec else IDS: ids.numpy(),
            "output.gates": routed["gates"].detach().numpy(),
            "output.load": np.array(load),
            "output.aux_loss": np.array(routed["aux"].item()),
            "output.z_loss": np.array(routed["z"].item())}


def check_routing_case(case):
    """route_forward (and, where the case has input.dgates, route_backward of
    sum(dgates * gates) + aux + z: routing_oracle's "w") by routing_oracle.check_routing."""
    c, report = oracle_case(case), Report()
    routed = routing.check_routing(c, case.config, report)
    if routed is None:
        return report, {}
    produced = routing_outputs(case, c, routed, report)
    if "input.dgates" in case.inputs:
        w = t64(case.inputs["input.dgates"])
        if report.shape("w", w, routed["gates"].shape):
            loss = torch.sum(w * routed["gates"]) + routed["aux"] + routed["z"]
            leaves = {"grad.x": routed["x"], "grad.router.weight": routed["weight"]}
            if routed["bias"] is not None:
                leaves["grad.router.bias"] = routed["bias"]
            produced.update(gradients(report, case, loss, leaves))
    return report, produced


def dispatch_order(ids, keep, num_experts, expert_choice=False):
    """(counts, offsets, row_token, row_slot) of the expert-major rows (reference/dispatch.h).
    Token choice: the kept pairs in (t, j) order, stably sorted by expert (a counting sort is a
    stable sort). Expert choice: expert e's block is its C chosen tokens ids[e], in that order, and
    a row's slot counts the token's earlier rows."""
    if expert_choice:
        E, C = ids.shape
        row_token = ids.flatten()
        seen = {}
        row_slot = []
        for t in row_token.tolist():
            row_slot.append(seen.get(t, 0))
            seen[t] = row_slot[-1] + 1
        row_slot, counts = torch.tensor(row_slot, dtype=torch.long), torch.full((E,), C, dtype=torch.long)
    else:
        token, slot = torch.where(keep.bool())         # row-major: (t, j) order
        experts = ids[token, slot]
        order = torch.sort(experts, stable=True).indices
        row_token, row_slot = token[order], slot[order]
        counts = torch.bincount(experts, minlength=num_experts)
    offsets = torch.cat((torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)))
    return counts, offsets, row_token, row_slot


def expert_outputs(x, gates, plan, experts, config, expert_choice):
    """Each expert row's FFN output before the combine (LayerOutput::expert_out): FFN_e(x_t), or
    FFN_e(g x_t) where the gate is placed on the input (Llama 4)."""
    _, offsets, row_token, row_slot = plan
    if expert_choice:
        row_gate = gates.flatten()
    else:
        row_gate = gates[row_token, row_slot]
    rows = []
    for e in range(len(experts)):
        r = slice(offsets[e].item(), offsets[e + 1].item())
        state = x[row_token[r]]
        if config["gate_placement"] == "input":
            state = state * row_gate[r, None]
        rows.append(layer.ffn(state, experts[e], config["expert"]))
    return torch.cat(rows) if rows else torch.zeros(0, x.shape[1])


def check_layer_case(case):
    """moe_layer_forward (and moe_layer_backward of sum(dy * y) + aux + z where the case has
    input.dy), with layer_oracle's pieces: the routing, capacity and dropping, the block; then the
    dispatch plan and the experts' outputs, which the layer oracle's cases do not hold."""
    config = case.config
    rc = config["routing"]
    ec = rc["selection"] == "expert_choice"
    if ec and not config["capacity"]["dropless"]:
        raise Unsupported("token dropping on an expert-choice layer (moelab rejects it)")
    c, report = oracle_case(case), Report()
    routed = routing.check_routing(c, rc, report)
    if routed is None:
        return report, {}
    produced = routing_outputs(case, c, routed, report)
    E = rc["num_experts"]
    ids = routed["ids"]
    keep = None if ec else layer.check_capacity(report, c, config, routed)
    if "output.keep" in case.expected:
        produced["output.keep"] = keep.int().numpy()
        produced["output.dropped"] = torch.bincount(ids[~keep], minlength=E).numpy()

    y, leaves, _, _ = layer.compute_block(c, config, routed, keep)
    report.close("y", t64(case.expected["output.y"]), y)
    produced["output.y"] = y.detach().numpy()

    plan = dispatch_order(ids, keep, E, ec)
    for name, mine in zip(("counts", "offsets", "row_token"), plan[:3]):
        exact(report, name, case.expected[f"output.{name}"], mine.numpy())
        produced[f"output.{name}"] = mine.numpy()
    experts = [{p: leaves[f"d_experts.{e}.{p}"] for p in layer.PARAMETERS if f"d_experts.{e}.{p}" in leaves}
               for e in range(E)]
    with torch.no_grad():
        expert_out = expert_outputs(routed["x"], routed["gates"], plan, experts, config, ec)
    report.close("expert_out", t64(case.expected["output.expert_out"]), expert_out)
    produced["output.expert_out"] = expert_out.numpy()

    if "input.dy" in case.inputs:
        dy = t64(case.inputs["input.dy"])
        if report.shape("dy", dy, y.shape):
            loss = torch.sum(dy * y) + routed["aux"] + routed["z"]
            produced.update(gradients(report, case, loss, {golden_gradient_name(n): leaf
                                                           for n, leaf in leaves.items()}))
    return report, produced


def golden_gradient_name(name):
    """layer_oracle's leaf names -> golden names: dx -> grad.x, d_experts.3.w_up -> grad.experts.3.w_up."""
    fixed = {"dx": "grad.x", "dweight": "grad.router.weight", "dbias": "grad.router.bias",
             "d_shared_gate": "grad.shared_gate"}
    if name in fixed:
        return fixed[name]
    prefix, rest = name.split(".", 1)
    return {"d_experts": "grad.experts.", "d_shared": "grad.shared."}[prefix] + rest


# ---- numerics: conversions -------------------------------------------------------------------------

# (safetensors dtype, exponent bits, mantissa bits, exponent bias, IEEE-like: all-ones exponent =
# inf/NaN). E4M3 is OCP E4M3FN: no infinities, only S.1111.111 is NaN.
FORMATS = {"bf16": ("BF16", 8, 7, 127, True), "fp16": ("F16", 5, 10, 15, True),
           "fp8_e4m3": ("F8_E4M3", 4, 3, 7, False), "fp8_e5m2": ("F8_E5M2", 5, 2, 15, True)}


def is_nan_code(bits, fmt):
    """Which codes are NaN, from the fields: all-ones exponent with a non-zero mantissa (IEEE-like),
    or all-ones exponent and mantissa (E4M3FN)."""
    _, e_bits, m_bits, _, ieee = FORMATS[fmt]
    bits = np.asarray(bits, dtype=np.int64)
    e, m = (bits >> m_bits) & ((1 << e_bits) - 1), bits & ((1 << m_bits) - 1)
    top = e == (1 << e_bits) - 1
    return top & (m != 0) if ieee else top & (m == (1 << m_bits) - 1)


def fp8_value(code, fmt):
    """One fp8 code's value from its fields S.E.M: (-1)^S 2^(E - bias) (1 + M / 2^m) for normal
    numbers, (-1)^S 2^(1 - bias) (M / 2^m) for E = 0 (subnormal), inf / NaN per the format."""
    _, e_bits, m_bits, bias, ieee = FORMATS[fmt]
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> m_bits) & ((1 << e_bits) - 1), code & ((1 << m_bits) - 1)
    if is_nan_code(code, fmt):
        return math.copysign(math.nan, sign)
    if ieee and e == (1 << e_bits) - 1:
        return sign * math.inf
    if e == 0:
        return sign * math.ldexp(m, 1 - bias - m_bits)
    return sign * math.ldexp((1 << m_bits) + m, e - bias - m_bits)


def decode_bits(bits, fmt):
    """Codes -> float32 values: bf16 and fp16 by reinterpreting the bits in torch, fp8 by fp8_value."""
    if fmt in ("bf16", "fp16"):
        dtype = torch.bfloat16 if fmt == "bf16" else torch.float16
        return torch.from_numpy(np.asarray(bits, np.uint16).view(np.int16)).view(dtype).float().numpy()
    return np.array([fp8_value(int(b), fmt) for b in np.asarray(bits).ravel()], dtype=np.float32)


def encode_fp8(x, fmt, saturating):
    """float32 -> fp8 code, round to nearest, ties to the even code; written from the definition
    rather than from bit tricks. The positive codes 0 .. max_code have increasing values; the code
    after the largest finite one (max_code + 1) stands for the next value the format would have
    with an unbounded exponent, max + (max - previous), and choosing it is an overflow: to +-max
    when saturating, else to inf (E5M2) or NaN (E4M3FN, no inf). So E5M2 overflows from the
    midpoint 61440 on (its tie goes to the even 0x7C), E4M3 only above 464 (its tie goes to 0x7E,
    448; 0x7F would be 480). +-0 keep their sign, as do values that round to zero. NaN -> NaN."""
    dtype = FORMATS[fmt][0]
    positive = [fp8_value(code, fmt) for code in range(0x80)]
    max_code = max(code for code in range(0x80) if math.isfinite(positive[code]))
    sign = 0x80 if math.copysign(1.0, x) < 0 else 0
    overflow = sign | (max_code if saturating else 0x7F if dtype == "F8_E4M3" else 0x7C)
    if math.isnan(x):
        return sign | 0x7F                       # S.1111.111: NaN in both formats
    a = abs(x)
    if math.isinf(a):
        return overflow
    beyond = 2 * positive[max_code] - positive[max_code - 1]
    if a >= beyond:
        return overflow
    magnitudes = positive[:max_code + 1] + [beyond]
    below = max(code for code, v in enumerate(magnitudes) if v <= a)
    if magnitudes[below] == a:
        code = below
    else:
        # Exact distances (Fraction): a and the codes' values are binary fractions.
        up, down = Fraction(magnitudes[below + 1]) - Fraction(a), Fraction(a) - Fraction(magnitudes[below])
        code = below if down < up or (down == up and below % 2 == 0) else below + 1
    return overflow if code > max_code else sign | code


def encode(values_f32, fmt, saturating):
    """Codes of float32 values: bf16 / fp16 by torch's conversion (round to nearest even, overflow
    to inf), fp8 by encode_fp8."""
    if fmt in ("bf16", "fp16"):
        if saturating:
            raise Unsupported(f"saturating conversion to {fmt}")
        dtype = torch.bfloat16 if fmt == "bf16" else torch.float16
        return torch.from_numpy(values_f32).to(dtype).view(torch.int16).numpy().view(np.uint16)
    return np.array([encode_fp8(float(v), fmt, saturating) for v in values_f32], dtype=np.uint8)


def stored_bits(array):
    """The codes of a stored tensor (moelab_golden keeps F16 as float16 values, BF16 / F8 as bits)."""
    return array.view(np.uint16) if array.dtype == np.float16 else array


def same_codes(report, name, golden_bits, mine_bits, fmt):
    """Bitwise, except that any NaN equals any NaN (docs/golden.md, "bitwise")."""
    golden_bits, mine_bits = np.asarray(golden_bits, np.int64), np.asarray(mine_bits, np.int64)
    both_nan = is_nan_code(golden_bits, fmt) & is_nan_code(mine_bits, fmt)
    differ = (golden_bits != mine_bits) & ~both_nan
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        report.fail(f"{name}[{i}]: golden 0x{golden_bits[i]:x}, oracle 0x{mine_bits[i]:x}; "
                    f"{int(differ.sum())} code(s) differ")


def check_numerics_case(case):
    fmt = case.config["format"]
    if fmt not in FORMATS:
        raise Unsupported(f"format {fmt!r}")
    report, produced = Report(), {}
    if case.name.startswith("numerics.encode."):
        x = case.inputs["input.values"].astype(np.float32)
        for name, saturating in (("output.bits", False), ("output.bits_saturated", True)):
            if name in case.expected:
                produced[name] = encode(x, fmt, saturating)
                same_codes(report, name, stored_bits(case.raw[name]), produced[name], fmt)
    elif case.name.startswith("numerics.decode."):
        bits = stored_bits(case.raw["input.bits"])
        mine = decode_bits(bits, fmt)
        produced["output.values"] = mine
        golden = case.raw["output.values"].astype(np.float32)
        nan = np.isnan(golden) & np.isnan(mine)
        differ = (golden.view(np.uint32) != mine.view(np.uint32)) & ~nan   # +0 and -0 differ
        if differ.any():
            i = int(np.flatnonzero(differ)[0])
            report.fail(f"output.values[{i}] (code 0x{int(bits[i]):x}): golden {golden[i]!r}, oracle "
                        f"{mine[i]!r}; {int(differ.sum())} value(s) differ")
    else:
        raise Unsupported(f"numerics case {case.name!r}")
    return report, produced


# ---- losses (reference/losses.h; docs/losses.md) -----------------------------------------------------
# x is the loss's differentiable input (probs, scores or logits), ids (T, k) constants.

def counts_of(ids, E):
    """#{(t, j) : ids[t, j] = i}; a token's k experts are distinct, so also #{t : t selects i}."""
    return F.one_hot(ids, E).sum(dim=(0, 1)).to(torch.float64)


def switch_loss(x, ids, cfg):  # Fedus et al. eq. 4: alpha E sum_i f_i P_i, f over the T k assignments
    T, k, E = ids.shape[0], ids.shape[1], x.shape[1]
    return cfg["alpha"] * E * torch.sum(counts_of(ids, E) / (T * k) * x.mean(dim=0))


def hf_loss(logits, ids, cfg):  # transformers' load_balancing_loss_func, one layer, no mask
    E = logits.shape[1]
    tokens_per_expert = F.one_hot(ids, E).to(torch.float64).mean(dim=0)       # (k, E)
    router_prob_per_expert = torch.softmax(logits, dim=-1).mean(dim=0)       # (E)
    return cfg["alpha"] * E * torch.sum(tokens_per_expert * router_prob_per_expert)


def megablocks_loss(x, ids, cfg):  # batched_load_balancing_loss: L layers stacked along the rows
    L, k, E = cfg["num_layers"], ids.shape[1], x.shape[1]
    T = ids.shape[0] // L                                                    # tokens per layer
    scale = E * cfg["alpha"] / (L * T * k)
    return scale * sum(torch.sum(counts_of(ids[l * T:(l + 1) * T], E) * x[l * T:(l + 1) * T].mean(dim=0))
                       for l in range(L))


def deepseek_v2_f_P(scores, ids):  # DeepSeek-V2 sec. 2.2.3: f_i = E / (k T) #{t selects i}, P_i = mean s
    T, k, E = ids.shape[0], ids.shape[1], scores.shape[1]
    return E / (k * T) * counts_of(ids, E), scores.mean(dim=0)


def deepseek_v2_expert_loss(scores, ids, cfg):  # expert-level: alpha1 sum_i f_i P_i
    f, P = deepseek_v2_f_P(scores, ids)
    return cfg["alpha"] * torch.sum(f * P)


def deepseek_v2_device_loss(scores, ids, cfg):  # device-level: f'_d mean of f, P'_d sum of P on device d
    f, P = deepseek_v2_f_P(scores, ids)
    D = cfg["num_devices"]
    return cfg["alpha"] * torch.sum(f.view(D, -1).mean(dim=1) * P.view(D, -1).sum(dim=1))


def deepseek_v2_comm_loss(scores, ids, cfg):  # communication: f''_d = D / (M T) #{t sent to device d}
    _, P = deepseek_v2_f_P(scores, ids)
    D, M, T, E = cfg["num_devices"], cfg["devices_per_token"], ids.shape[0], scores.shape[1]
    sent = F.one_hot(ids // (E // D), D).amax(dim=1).to(torch.float64)      # (T, D): t reaches d
    return cfg["alpha"] * torch.sum(D / (M * T) * sent.sum(dim=0) * P.view(D, -1).sum(dim=1))


def deepseek_v3_sequence_loss(scores, ids, cfg):  # DeepSeek-V3 eqs. 17-20, mean over the sequences
    k, E = ids.shape[1], scores.shape[1]
    total, begin = torch.zeros(()), 0
    for length in cfg["sequence_lengths"]:
        s = scores[begin:begin + length]
        P = (s / s.sum(dim=-1, keepdim=True)).mean(dim=0)                      # eqs. 19-20
        f = E / (k * length) * counts_of(ids[begin:begin + length], E)         # eq. 18
        total = total + cfg["alpha"] * torch.sum(f * P)                         # eq. 17
        begin += length
    return total / len(cfg["sequence_lengths"])


def z_loss(logits, ids, cfg):  # ST-MoE eq. 5: coef mean_t logsumexp(logits_t)^2
    return cfg["alpha"] * torch.mean(torch.logsumexp(logits, dim=-1) ** 2)


LOSSES = {"switch": switch_loss, "hf": hf_loss, "megablocks": megablocks_loss,
          "deepseek_v2_expert": deepseek_v2_expert_loss, "deepseek_v2_device": deepseek_v2_device_loss,
          "deepseek_v2_comm": deepseek_v2_comm_loss, "deepseek_v3_sequence": deepseek_v3_sequence_loss,
          "z_loss": z_loss}


def check_loss_case(case):
    cfg = case.config
    if cfg["loss"] not in LOSSES:
        raise Unsupported(f"loss {cfg['loss']!r}")
    report = Report()
    x = t64(case.inputs[cfg["input"]]).requires_grad_(True)
    ids = long(case.inputs["input.ids"])
    loss = LOSSES[cfg["loss"]](x, ids, cfg)
    report.close("output.loss", t64(case.expected["output.loss"]), loss)
    produced = {"output.loss": np.array(loss.item())}
    produced.update(gradients(report, case, loss, {"grad." + cfg["input"].split(".", 1)[1]: x}))
    return report, produced


# ---- balancing, capacity, dispatch, combine --------------------------------------------------------

def check_bias_update_case(case):
    """DeepSeek-V3's auxiliary-loss-free balancing (sec. 2.1.2): b_i += gamma sign(mean load - load_i)
    (an expert at the mean load keeps its bias: sign 0)."""
    report = Report()
    bias, load = t64(case.inputs["input.bias"]), t64(case.inputs["input.load"])
    updated = bias + case.config["gamma"] * torch.sign(load.mean() - load)
    report.close("output.bias", t64(case.expected["output.bias"]), updated)
    return report, {"output.bias": updated.numpy()}


def check_capacity_case(case):
    """capacity = round(factor T k / E) in exact arithmetic, >= min_capacity (layer_oracle's
    expert_capacity); the pairs kept by GShard's Algorithm 1 slot-major in column order of ids,
    tokens in arrival order or by largest gate (layer_oracle's token_order / keep_of)."""
    cfg = case.config
    report = Report()
    ids = long(case.inputs["input.ids"])
    gates = t64(case.inputs["input.gates"])
    T, k = ids.shape
    E = cfg["num_experts"]
    if cfg["capacity"]["dropless"]:
        raise Unsupported("a dropless capacity case")
    capacity = layer.expert_capacity(T, k, E, cfg["capacity"])
    order = layer.token_order(gates.amax(dim=1), cfg["capacity"]["policy"])
    keep = layer.keep_of(ids, ids.tolist(), order, capacity, E)
    dropped = torch.bincount(ids[~keep], minlength=E)
    produced = {"output.capacity": np.array([capacity]), "output.keep": keep.int().numpy(),
                "output.dropped": dropped.numpy()}
    for name, mine in produced.items():
        exact(report, name, case.expected[name], mine)
    return report, produced


def check_dispatch_case(case):
    """The counting-sort plan of the kept pairs (dispatch_order), the gather permuted_r = x_{token(r)},
    and its gradient by autograd of sum(dpermuted * permuted) (a scatter-add)."""
    report = Report()
    ids, keep = long(case.inputs["input.ids"]), long(case.inputs["input.keep"])
    x = t64(case.inputs["input.x"]).requires_grad_(True)
    counts, offsets, row_token, _ = dispatch_order(ids, keep, case.config["num_experts"])
    produced = {"output.counts": counts.numpy(), "output.offsets": offsets.numpy(),
                "output.row_token": row_token.numpy()}
    for name, mine in produced.items():
        exact(report, name, case.expected[name], mine)
    permuted = x[row_token]
    report.close("output.permuted", t64(case.expected["output.permuted"]), permuted)
    produced["output.permuted"] = permuted.detach().numpy()
    dpermuted = t64(case.inputs["input.dpermuted"])   # in the reference's row order, which exact() checked
    if report.shape("input.dpermuted", dpermuted, permuted.shape):
        produced.update(gradients(report, case, torch.sum(dpermuted * permuted), {"grad.x": x}))
    return report, produced


def check_combine_case(case):
    """y_t = sum over the rows r of token t of w_r expert_out_r (index_add_), gradients by autograd
    of sum(dy * y)."""
    report = Report()
    row_token = long(case.inputs["input.row_token"])
    weight = t64(case.inputs["input.row_weight"]).requires_grad_(True)
    expert_out = t64(case.inputs["input.expert_out"]).requires_grad_(True)
    y = torch.zeros(case.config["tokens"], expert_out.shape[1]).index_add(0, row_token, weight[:, None] * expert_out)
    report.close("output.y", t64(case.expected["output.y"]), y)
    produced = {"output.y": y.detach().numpy()}
    loss = torch.sum(t64(case.inputs["input.dy"]) * y)
    produced.update(gradients(report, case, loss, {"grad.expert_out": expert_out, "grad.row_weight": weight}))
    return report, produced


# ---- experts, the shared expert gate -----------------------------------------------------------------

def check_experts_case(case):
    """One expert (layer_oracle.ffn: SwiGLU, GELU (erf), ReLU, gpt-oss's clamped SwiGLU) on the
    stored rows, gradients by autograd of sum(dy * y)."""
    report = Report()
    x = t64(case.inputs["input.x"]).requires_grad_(True)
    params = {p: t64(case.inputs[f"param.expert.{p}"]).requires_grad_(True)
              for p in layer.PARAMETERS if f"param.expert.{p}" in case.inputs}
    y = layer.ffn(x, params, case.config)
    report.close("output.y", t64(case.expected["output.y"]), y)
    produced = {"output.y": y.detach().numpy()}
    if "input.dy" in case.inputs:
        leaves = {"grad.x": x, **{f"grad.expert.{p}": leaf for p, leaf in params.items()}}
        produced.update(gradients(report, case, torch.sum(t64(case.inputs["input.dy"]) * y), leaves))
    return report, produced


def check_shared_gate_case(case):
    """Qwen2-MoE's shared expert gate: y_t = sigmoid(x_t . w) shared_out_t (w is an
    nn.Linear(C, 1, bias=False) weight), gradients by autograd of sum(dy * y)."""
    report = Report()
    x = t64(case.inputs["input.x"]).requires_grad_(True)
    w = t64(case.inputs["param.shared_gate"]).requires_grad_(True)
    shared_out = t64(case.inputs["input.shared_out"]).requires_grad_(True)
    gate = torch.sigmoid(F.linear(x, w))                     # (T, 1)
    y = gate * shared_out
    report.close("output.gate", t64(case.expected["output.gate"]), gate[:, 0])
    report.close("output.y", t64(case.expected["output.y"]), y)
    produced = {"output.gate": gate[:, 0].detach().numpy(), "output.y": y.detach().numpy()}
    leaves = {"grad.x": x, "grad.shared_gate": w, "grad.shared_out": shared_out}
    produced.update(gradients(report, case, torch.sum(t64(case.inputs["input.dy"]) * y), leaves))
    return report, produced


CHECKERS = {"routing": check_routing_case, "layer": check_layer_case, "numerics": check_numerics_case,
            "losses": check_loss_case, "balancing": check_bias_update_case, "capacity": check_capacity_case,
            "dispatch": check_dispatch_case, "combine": check_combine_case, "experts": check_experts_case,
            "shared_experts": check_shared_gate_case}


# ---- one case: both verdicts ---------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    status: str                  # PASS, FAIL, AMBIGUOUS, SKIP
    failures: list               # messages
    ambiguous: list              # messages
    oracle_worst: float = None   # fraction of the oracle's tolerance (its Report.worst)
    golden_worst: float = None   # worst |oracle - golden| / (atol + rtol |golden|) over allclose checks
    oracle_failed: set = dataclasses.field(default_factory=set)    # golden names of the tensors each
    golden_failed: set = dataclasses.field(default_factory=set)    # verdict failed (for the self-test)
    skipped: str = ""


def failed_tensor(message, case):
    """The golden tensor an oracle failure message names (its first word: "y[3,4]: ...")."""
    field = message.split(":")[0].split("[")[0].strip()
    if field == "ids":
        return EC_IDS if EC_IDS in case.expected else IDS
    return ORACLE_FIELDS.get(field, field)


def judge(case):
    """Both verdicts on one case: the oracle's own comparison (its Report), then moelab_golden's
    checks of the oracle's values against the golden values with the case's tolerances. Every
    checked tensor must be recomputed ("not supported" is a failure here)."""
    component = case.entry.get("component")
    if component not in CHECKERS:
        return Result("FAIL", [f"no oracle for component {component!r}"], [])
    try:
        report, produced = CHECKERS[component](case)
    except Unsupported as reason:
        return Result("SKIP", [], [], skipped=str(reason))
    except Exception as error:  # a malformed case, or a bug here: a failure, never a pass
        report, produced = Report(), {}
        report.fail(f"the oracle could not check it: {error!r}")
    failures, ambiguous = list(report.failures), list(report.ambiguous)
    oracle_failed, golden_failed = {failed_tensor(m, case) for m in failures}, set()
    golden_worst = None
    if not failures or produced:
        try:
            golden = mg.compare(case, produced)
        except mg.GoldenError as error:   # a check this golden set cannot run: a bad set
            return Result("FAIL", failures + [f"golden: {error}"], ambiguous, oracle_failed=oracle_failed)
        golden_worst = golden.worst
        for check in golden.checks:
            if check.verdict == mg.FAIL:
                failures.append(f"golden check {check.tensor} ({check.compare}, {check.tolerance}): {check.message}")
                golden_failed.add(check.tensor)
            elif check.verdict == mg.NOT_SUPPORTED and not report.failures:
                failures.append(f"golden check {check.tensor}: the oracle does not recompute it")
            elif check.verdict == mg.AMBIGUOUS or check.left_out:
                ambiguous.append(f"golden check {check.tensor}: {check.message}")
        if golden_worst is not None and not golden_worst <= 1.0:
            failures.append(f"golden: worst error {golden_worst:.3g} of the tolerance")
    oracle_worst = report.worst[0] if report.worst[0] >= 0 else None
    status = "FAIL" if failures else "AMBIGUOUS" if ambiguous else "PASS"
    return Result(status, failures, ambiguous, oracle_worst, golden_worst, oracle_failed, golden_failed)


def fraction(x):
    return "all exact" if x is None else f"{x:.3g} of its tolerance"   # None: only exact / bitwise checks


def load_cases(golden_dir, pattern):
    """[(name, Case or the error that kept it from loading)] for the manifest entries matching."""
    out = []
    for entry in mg.cases(golden_dir, pattern):
        try:
            out.append((entry["name"], mg.load_case(golden_dir, entry["name"])))
        except mg.GoldenError as error:
            out.append((entry["name"], error))
    return out


def run(cases):
    counts = {"PASS": 0, "FAIL": 0, "AMBIGUOUS": 0, "SKIP": 0}
    worst = (-1.0, "")
    width = max(len(name) for name, _ in cases)
    for name, case in cases:
        result = Result("FAIL", [f"unreadable: {case}"], []) if isinstance(case, Exception) else judge(case)
        counts[result.status] += 1
        line = f"{result.status:<10} {name:<{width}}  "
        if result.status == "SKIP":
            print(line + result.skipped)
            continue
        if result.golden_worst is not None and result.golden_worst > worst[0]:
            worst = (result.golden_worst, name)
        print(line + f"oracle {fraction(result.oracle_worst)}, golden {fraction(result.golden_worst)}")
        for message in result.failures[:8]:
            print(f"           - {message}")
        if len(result.failures) > 8:
            print(f"           - ... and {len(result.failures) - 8} more")
        if result.status == "AMBIGUOUS":
            print(f"           near-tie: {result.ambiguous[0]}"
                  + (f" (and {len(result.ambiguous) - 1} more)" if len(result.ambiguous) > 1 else ""))
    summary = f"{counts['PASS']} passed, {counts['FAIL']} failed"
    for key, word in (("AMBIGUOUS", "ambiguous"), ("SKIP", "skipped")):
        if counts[key]:
            summary += f", {counts[key]} {word}"
    if worst[0] >= 0:
        summary += f"; worst golden error {worst[0]:.3g} of its tolerance ({worst[1]})"
    print(summary)
    return 1 if counts["FAIL"] or counts["PASS"] + counts["AMBIGUOUS"] == 0 else 0


# ---- self-test: wrong golden values must fail ------------------------------------------------------

def with_expected(case, name, value, bits=None):
    """A copy of the case whose expected tensor `name` is `value` (and its stored bits `bits`)."""
    expected, raw = dict(case.expected), dict(case.raw)
    expected[name] = value
    raw[name] = value if bits is None else bits
    return dataclasses.replace(case, expected=expected, raw=raw)


def check_of(case, name):
    return next((c for c in case.checks if c["tensor"] == name), None)


def beyond_tolerance(case, name):
    """Element 0 of an allclose-checked tensor moved by 10 of its golden tolerances."""
    check = check_of(case, name)
    value = case.expected[name].copy()
    flat = value.reshape(-1)
    flat[0] += 10 * (check["atol"] + check["rtol"] * abs(flat[0]))
    kind = "output.y beyond its tolerance" if name == "output.y" else "another value beyond its tolerance"
    return (kind, f"{name}[0] off by 10 of its tolerance", name, with_expected(case, name, value))


def swapped_id(case):
    """One id replaced by the candidate the selection ranked lowest for that row: far from any tie."""
    name = EC_IDS if EC_IDS in case.expected else IDS
    ids = case.expected[name].copy()
    check = check_of(case, name)
    if check["compare"] == "topk_set":
        ranking = case.expected[check["ranking"]]
        ranking = ranking.T if check.get("transposed") else ranking           # (rows, candidates)
        row = 0
        unchosen = [c for c in range(ranking.shape[1]) if c not in ids[row]]
        if not unchosen:
            return None
        worst = min(unchosen, key=lambda c: ranking[row, c])
        gap = ranking[row, ids[row, 0]] - ranking[row, worst]
        if not gap > check["atol"] + check["rtol"] * max(abs(ranking[row, ids[row, 0]]), abs(ranking[row, worst])):
            return None
        what = f"{name}[0, 0]: {ids[row, 0]} -> {worst}, ranked {gap:.3g} lower"
        ids[row, 0] = worst
    else:  # hash routing: the id is a function of the token id
        limit = routing_config(case)["num_experts"]
        what = f"{name}[0, 0]: {ids[0, 0]} -> {(ids[0, 0] + 1) % limit}"
        ids[0, 0] = (ids[0, 0] + 1) % limit
    return ("an id swapped far from a tie", what, name, with_expected(case, name, ids))


def flipped_bit(case, name, fmt):
    """The lowest bit of the first code whose neighbour is another non-NaN code."""
    bits = stored_bits(case.raw[name]).copy()
    for i, b in enumerate(bits.tolist()):
        if not is_nan_code(b, fmt) and not is_nan_code(b ^ 1, fmt):
            bits[i] = b ^ 1
            dtype = FORMATS[fmt][0]
            stored = bits.view(np.float16) if dtype == "F16" else bits   # as moelab_golden stores it
            values = mg.decode(stored, dtype).astype(np.float32)
            return ("an encoding bit flipped", f"{name}[{i}]: code 0x{b:x} -> 0x{b ^ 1:x}", name,
                    with_expected(case, name, values, stored))
    return None


def mutations(case):
    """(kind, what, golden tensor, mutated case): wrong expected values that the oracle must fail."""
    out = []
    component = case.entry.get("component")
    if "output.y" in case.expected:
        out.append(beyond_tolerance(case, "output.y"))
    if IDS in case.expected or EC_IDS in case.expected:
        out.append(swapped_id(case))
    if component == "numerics":
        fmt = case.config["format"]
        for name in ("output.bits", "output.bits_saturated"):
            if name in case.expected:
                out.append(flipped_bit(case, name, fmt))
        if "output.values" in case.expected:       # a decoded value with its lowest mantissa bit flipped
            bits = case.raw["output.values"].view(np.uint32).copy()
            i = int(np.flatnonzero(np.isfinite(case.expected["output.values"]))[1])
            bits[i] ^= 1
            out.append(("a decoded value's bit flipped", f"output.values[{i}]: lowest bit flipped", "output.values",
                        with_expected(case, "output.values", bits.view(np.float32))))
    if component in ("capacity",):
        keep = case.expected["output.keep"].copy()
        keep[0, -1] ^= 1
        out.append(("a kept pair dropped or a dropped one kept", "output.keep[0, -1] flipped", "output.keep",
                    with_expected(case, "output.keep", keep)))
    # And the first other allclose-checked tensor (a loss, a gradient, a bias ...).
    other = next((c["tensor"] for c in case.checks if c["compare"] == "allclose" and c["tensor"] != "output.y"), None)
    if other:
        out.append(beyond_tolerance(case, other))
    return [m for m in out if m is not None]


# Every golden set must give the self-test at least one mutation of each of these kinds.
REQUIRED_KINDS = ("output.y beyond its tolerance", "an id swapped far from a tie", "an encoding bit flipped")


def self_test(cases):
    """Every mutation of every case that passes must make it FAIL, both verdicts naming the mutated
    tensor: the oracle's float64 comparison and the golden check with the case's tolerance."""
    caught, missed = Counter(), 0
    for name, case in cases:
        if isinstance(case, Exception):
            continue
        status = judge(case).status
        if status not in ("PASS", "AMBIGUOUS"):
            print(f"self-test: {name}: {status} as it is, so its mutations prove nothing; left out")
            continue
        for kind, what, tensor, mutated in mutations(case):
            result = judge(mutated)
            if result.status == "FAIL" and tensor in result.oracle_failed and tensor in result.golden_failed:
                caught[kind] += 1
            else:
                missed += 1
                print(f"MISSED     {name}: {what}: {result.status} (oracle failed {sorted(result.oracle_failed)}, "
                      f"golden failed {sorted(result.golden_failed)})")
    absent = [kind for kind in REQUIRED_KINDS if not caught[kind]]
    for kind in absent:
        print(f"self-test: no case gave a mutation '{kind}'")
    print(f"self-test: {sum(caught.values())} mutations caught "
          f"({', '.join(f'{n} {kind}' for kind, n in caught.items())}), {missed} missed")
    return 1 if missed or absent else 0


def main(arguments):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("golden_dir")
    parser.add_argument("--filter", default="*", metavar="GLOB", help="case names (a shell glob)")
    parser.add_argument("--self-test", action="store_true",
                        help="fail mutated golden values instead of checking the set")
    args = parser.parse_args(arguments)
    try:
        cases = load_cases(args.golden_dir, args.filter)
    except mg.GoldenError as error:
        print(f"golden_oracle: {error}")
        print("0 passed, 1 failed")
        return 1
    if not cases:
        print(f"golden_oracle: no case matches {args.filter!r} in {args.golden_dir}")
        print("0 passed, 1 failed")
        return 1
    return self_test(cases) if args.self_test else run(cases)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
