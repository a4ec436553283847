"""labcheck: the check cells of the moelab labs.

Every `check_*` function takes the function a student wrote, runs it on inputs whose answer is
known (the golden set in golden/, computed by moelab's reference in float64; a few hand-made probes
for ties, overflow and empty experts), and either prints one line per thing it verified or raises
`LabCheckError` saying WHAT is wrong: the shape, the dtype, the convention ("gates sum to 0.62:
Mixtral renormalises over the top-k only"), and where (the first token and expert that differ).

Where a wrong answer matches a known mistake (softmax over the wrong axis, no renormalisation, top-k
of the scores where the logits are ranked, capacity rounded down, `y[idx] += ...` with repeated
indices, ...), the message names the mistake. The mistakes are recognised by computing them: each
`_variants_*` function below returns the outputs of the usual wrong versions, and a student's
output that equals one of them gets that variant's explanation.

numpy only (plus golden/moelab_golden.py, numpy only): the checks work without the compiled module.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(os.environ.get("MOELAB_ROOT", Path(__file__).resolve().parent.parent))
GOLDEN = ROOT / "golden"
CORPUS = ROOT / "data" / "corpus"
sys.path.insert(0, str(GOLDEN))
import moelab_golden as mg  # noqa: E402  (golden/moelab_golden.py: numpy only)


class LabCheckError(AssertionError):
    """A check failed; the message says what is wrong and where."""


def _fail(message: str):
    raise LabCheckError(message)


def _ok(message: str) -> None:
    print("\N{CHECK MARK} " + message)


# ---- finding things -----------------------------------------------------------------------------
def moelab_bin() -> Path:
    """The `moelab` command line: $MOELAB_BIN, else build/bin/moelab."""
    return Path(os.environ.get("MOELAB_BIN", ROOT / "build" / "bin" / "moelab"))


def cli(*args: str) -> dict:
    """Runs `moelab ARGS --json` and returns its JSON document (non-finite numbers as floats)."""
    command = [str(moelab_bin()), *map(str, args), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")

    def number(s):
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(s, s)

    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return number(v) if isinstance(v, str) else v
    return fix(json.loads(done.stdout))


def import_moelab():
    """The compiled module (from PYTHONPATH, else the default build's build/python), or an error
    that says how to get it."""
    try:
        import moelab  # noqa: F401
    except ImportError:
        sys.path.append(str(ROOT / "build" / "python"))
    try:
        import moelab  # noqa: F401,F811
    except ImportError as e:
        raise ImportError(
            "the moelab Python module is not on PYTHONPATH. Build it with "
            "`cmake --build build --target moelab_python` and start the labs with tools/labs.sh "
            f"(it sets PYTHONPATH=build/python). ({e})") from None
    return sys.modules["moelab"]


def golden(name: str) -> mg.Case:
    return mg.load_case(str(GOLDEN), name)


# ---- generic array checks ------------------------------------------------------------------------
def _array(name, value, *, shape=None, kind="f", what=""):
    """value as an array of the right shape and kind ('f' float, 'i' integer, 'b' 0/1 mask)."""
    if value is None:
        _fail(f"{name} is None: does your function end with `return`?")
    if isinstance(value, tuple) and shape is not None and len(shape) > 0:
        _fail(f"{name} is a tuple of {len(value)}, expected one array of shape {shape}")
    a = np.asarray(value)
    if a.dtype == object:
        _fail(f"{name} is not a numeric array (dtype object): return a numpy array")
    if shape is not None and a.shape != tuple(shape):
        hint = f" ({what})" if what else ""
        if a.shape == tuple(shape)[::-1] and len(shape) == 2:
            hint += ": transposed?"
        elif a.size == math.prod(shape):
            hint += ": the right number of elements, reshape it"
        _fail(f"{name} has shape {a.shape}, expected {tuple(shape)}{hint}")
    if kind == "i":
        if a.dtype.kind == "f":
            _fail(f"{name} has dtype {a.dtype}: expert/token ids must be integers "
                  f"(np.argsort and np.argmax return int64; astype(np.int64) if you built floats)")
        if a.dtype.kind not in "iub":
            _fail(f"{name} has dtype {a.dtype}, expected integers")
        return a.astype(np.int64)
    if kind == "b":
        if a.dtype.kind == "f" and not np.all((a == 0) | (a == 1)):
            _fail(f"{name} must hold 0/1 (or True/False), found {a[(a != 0) & (a != 1)][:3]}")
        return a.astype(np.int64)
    if a.dtype.kind not in "fiub":
        _fail(f"{name} has dtype {a.dtype}, expected floating point")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        _fail(f"{name} is {a[tuple(bad)]} at {tuple(int(i) for i in bad)}: overflow? "
              f"(exp of a large logit is inf, inf / inf is NaN)")
    return a


def _where(index) -> str:
    index = tuple(int(i) for i in np.atleast_1d(index))
    return f"token {index[0]}" + (f", column {index[1]}" if len(index) > 1 else "")


def _close(got, expected, rtol=1e-6, atol=1e-9):
    return got.shape == expected.shape and np.allclose(got, expected, rtol=rtol, atol=atol)


def _first_difference(got, expected, rtol=1e-6, atol=1e-9):
    bad = ~np.isclose(got, expected, rtol=rtol, atol=atol)
    return None if not bad.any() else tuple(int(i) for i in np.argwhere(bad)[0])


def _sorted_rows(ids, values):
    """Each row's (ids, values) ordered by id: compares top-k results whatever their order."""
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)


def _no_modification(name, before, after):
    if not np.array_equal(before, after, equal_nan=True):
        _fail(f"your function modified its input `{name}` in place; compute into a new array "
              f"(the caller still needs the original)")


# ---- reference helpers (float64, the conventions moelab documents) ------------------------------
def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _topk(values, k):
    """Best first, ties to the lower id: a stable sort of the negated values."""
    return np.argsort(-values, axis=1, kind="stable")[:, :k]


def _pick(values, ids):
    return np.take_along_axis(values, ids, axis=1)


# =================================================================================================
# Lab 1 -- routing
# =================================================================================================
def check_softmax(softmax):
    """softmax(logits (T, E)) -> probabilities (T, E), over the experts of each token."""
    case = golden("mixtral.routing.fp32")
    logits, expected = case.expected["output.logits"], case.expected["output.scores"]
    before = logits.copy()
    got = _array("softmax(logits)", softmax(logits), shape=expected.shape, what="(tokens, experts)")
    _no_modification("logits", before, logits)
    if not _close(got, expected):
        if _close(got, _softmax(logits, axis=0)):
            _fail("your probabilities sum to 1 down each column (over the 16 tokens), not along each "
                  "row: the softmax of a router is over the experts of one token, axis=-1 "
                  "(use keepdims=True so the row sums broadcast)")
        if _close(got, np.exp(logits) / np.exp(logits).sum()):
            _fail("your probabilities sum to 1 over the whole matrix: normalise each row "
                  "(sum over axis=-1 with keepdims=True)")
        rows = got.sum(axis=1)
        if not np.allclose(rows, 1):
            t = int(np.argmax(np.abs(rows - 1)))
            _fail(f"the probabilities of token {t} sum to {rows[t]:.6g}, not 1")
        t = _first_difference(got, expected)
        _fail(f"first difference at {_where(t)}: {got[t]:.6g}, expected {expected[t]:.6g}")
    _ok(f"softmax of {logits.shape[0]} tokens x {logits.shape[1]} experts matches moelab's scores "
        f"(max error {np.abs(got - expected).max():.1e})")
    big = np.array([[1000.0, 0.0, -1000.0], [-5000.0, -5001.0, -5002.0]])
    with np.errstate(all="ignore"):
        got = np.asarray(softmax(big), dtype=np.float64)
    if not np.all(np.isfinite(got)):
        _fail("softmax([1000, 0, -1000]) gave " + np.array2string(got[0], precision=3) +
              ": exp(1000) overflows to inf (and exp(-5000) underflows to 0, 0/0 = NaN). Subtract "
              "each row's max before exp: the same function, but every exponent is <= 0 "
              "(the stable softmax, docs/numerics.md)")
    if not _close(got, _softmax(big)):
        _fail(f"softmax of large logits: got {got.tolist()}, expected {_softmax(big).tolist()}")
    _ok("stable for logits of +-1000 and -5000 (no overflow: the row max is subtracted)")


def check_topk(topk):
    """topk(values (T, E), k) -> ids (T, k): the k largest per row, best first, ties to the lower id."""
    case = golden("mixtral.routing.fp32")
    logits = case.expected["output.logits"]
    for k in (1, 2, 3):
        before = logits.copy()
        got = _array(f"topk(logits, k={k})", topk(logits, k), shape=(logits.shape[0], k), kind="i",
                     what="one row per token, k expert ids")
        _no_modification("values", before, logits)
        expected = _topk(logits, k)
        if np.array_equal(got, expected):
            continue
        if np.array_equal(got, np.argsort(logits, axis=1, kind="stable")[:, :k]):
            _fail(f"k={k}: you picked the k SMALLEST values (np.argsort sorts ascending): "
                  f"sort the negated values, np.argsort(-values, axis=1)")
        if np.array_equal(np.sort(got, 1), np.sort(expected, 1)):
            t = int(np.argmax(np.any(got != expected, axis=1)))
            _fail(f"k={k}: the right experts but not best first: token {t} has {got[t].tolist()}, "
                  f"expected {expected[t].tolist()} (values {np.round(logits[t, expected[t]], 4).tolist()})")
        t = int(np.argmax(np.any(np.sort(got, 1) != np.sort(expected, 1), axis=1)))
        _fail(f"k={k}: token {t} got experts {got[t].tolist()}, expected {expected[t].tolist()} "
              f"(its values: {np.round(logits[t], 3).tolist()})")
    _ok("top-1, top-2, top-3 of 16 tokens match (best first)")
    ties = np.array([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0], [1.0, 3.0, 0.5, 3.0]])
    for k in (1, 2):
        got = _array(f"topk(ties, k={k})", topk(ties, k), shape=(3, k), kind="i")
        expected = _topk(ties, k)
        if not np.array_equal(got, expected):
            t = int(np.argmax(np.any(got != expected, axis=1)))
            _fail(f"tie-breaking: values {ties[t].tolist()}, k={k}: you chose {got[t].tolist()}, "
                  f"moelab chooses {expected[t].tolist()}. Equal values go to the LOWER expert id "
                  f"(a stable descending sort: np.argsort(-values, kind='stable')); reversing an "
                  f"ascending argsort (argsort(v)[:, ::-1]) reverses the ties too. torch.topk "
                  f"promises no order at all for ties, which is one reason two implementations "
                  f"disagree on the same input")
    _ok("exact ties go to the lower expert id, as in moelab (docs/routing.md, Selection)")


def _routing_case(preset):
    case = golden(f"{preset}.routing.fp32")
    cfg = case.config
    logits = case.expected["output.logits"]
    return case, cfg, logits


def _check_routing_output(label, case, ids, gates, variants):
    """ids/gates against the golden case (through moelab_golden's checks), else the variants."""
    T, k = case.expected["output.topk_ids"].shape
    ids = _array(f"{label}: ids", ids, shape=(T, k), kind="i", what="(tokens, k)")
    gates = _array(f"{label}: gates", gates, shape=(T, k), what="(tokens, k), gate j of expert ids[t, j]")
    if np.any((ids < 0) | (ids >= case.expected["output.scores"].shape[1])):
        _fail(f"{label}: expert ids outside [0, E)")
    if any(len(set(r)) != k for r in ids.tolist()):
        t = next(i for i, r in enumerate(ids.tolist()) if len(set(r)) != k)
        _fail(f"{label}: token {t} chose the same expert twice: {ids[t].tolist()}")
    report = mg.compare(case, {"output.topk_ids": ids, "output.gates": gates})
    if report.ok:
        return report
    ref_ids = case.expected["output.topk_ids"].astype(np.int64)
    sets_ok = all(set(a) == set(b) for a, b in zip(ids.tolist(), ref_ids.tolist()))
    mine = _sorted_rows(ids, gates)
    for message, v_ids, v_gates in variants:
        theirs = _sorted_rows(v_ids, v_gates)
        if np.array_equal(mine[0], theirs[0]) and np.allclose(mine[1], theirs[1], rtol=1e-6, atol=1e-9):
            _fail(f"{label}: {message}")
    if not sets_ok:
        t = next(i for i, (a, b) in enumerate(zip(ids.tolist(), ref_ids.tolist())) if set(a) != set(b))
        ranking = case.expected["output.ranking"][t]
        _fail(f"{label}: token {t} chose experts {sorted(ids[t].tolist())}, moelab chose "
              f"{sorted(ref_ids[t].tolist())} (the values moelab ranks for this token: "
              f"{np.round(ranking, 4).tolist()})")
    ref = _sorted_rows(ref_ids, case.expected["output.gates"])
    if np.allclose(np.sort(gates, 1), np.sort(case.expected["output.gates"], 1), rtol=1e-6, atol=1e-9):
        t = int(np.argmax(~np.all(np.isclose(mine[1], ref[1], rtol=1e-6, atol=1e-9), axis=1)))
        _fail(f"{label}: the right gate values, attached to the wrong experts: gates[t, j] must be the "
              f"gate of expert ids[t, j] (token {t}: ids {ids[t].tolist()}, gates "
              f"{np.round(gates[t], 4).tolist()}; moelab: ids {ref_ids[t].tolist()}, gates "
              f"{np.round(case.expected['output.gates'][t], 4).tolist()})")
    t, j = np.argwhere(~np.isclose(mine[1], ref[1], rtol=1e-6, atol=1e-9))[0]
    _fail(f"{label}: token {t}, expert {mine[0][t, j]}: gate {mine[1][t, j]:.6g}, expected "
          f"{ref[1][t, j]:.6g} (your gates of token {t} sum to {gates[t].sum():.4g}, moelab's to "
          f"{ref[1][t].sum():.4g})")


def _variants_softmax_topk(logits, k, renormalize):
    p = _softmax(logits)
    ids = _topk(p, k)
    g = _pick(p, ids)
    norm = g / g.sum(1, keepdims=True)
    out = []
    if renormalize:
        out.append(("your gates of each token sum to " + f"{g.sum(1).mean():.3g} on average, but this "
                    "convention renormalises them over the top-k (divide by their sum, so they sum to "
                    "1): Qwen3's norm_topk_prob = true, GShard's g_i / (g_1 + g_2)", ids, g))
    else:
        out.append(("your gates sum to 1 for every token, but this convention uses the softmax "
                    "probabilities of the selected experts as they are (Switch; Qwen1.5-MoE and OLMoE "
                    f"with norm_topk_prob = false): they sum to {g.sum(1).mean():.3g} on average here. "
                    "Renormalise only when asked", ids, norm))
    pc = _softmax(logits, axis=0)
    ic = _topk(pc, k)
    out.append(("softmax over the wrong axis: your probabilities sum to 1 over the tokens (axis 0); "
                "a router's softmax is over each token's experts (axis=-1)", ic,
                _pick(pc, ic) / (_pick(pc, ic).sum(1, keepdims=True) if renormalize else 1)))
    out.append(("your gates are the raw logits of the selected experts: apply the softmax first",
                ids, _pick(logits, ids)))
    return out


def check_route_softmax_topk(route_softmax_topk):
    """route_softmax_topk(logits, k, renormalize) -> (ids, gates): softmax over all experts, top-k of
    the probabilities, gates = the selected probabilities (renormalised to sum 1 if asked)."""
    for preset in ("switch", "qwen2_moe", "olmoe", "gshard", "qwen3_moe"):
        case, cfg, logits = _routing_case(preset)
        k, renorm = cfg["top_k"], cfg["gating"]["renormalize"]
        before = logits.copy()
        out = route_softmax_topk(logits, k, renorm)
        _no_modification("logits", before, logits)
        if not isinstance(out, tuple) or len(out) != 2:
            _fail(f"{preset}: return a tuple (ids, gates), got {type(out).__name__}")
        label = f"{preset} (k={k}, renormalize={renorm})"
        _check_routing_output(label, case, *out, _variants_softmax_topk(logits, k, renorm))
        _ok(f"{label}: experts and gates of {logits.shape[0]} tokens match the golden case")


def _variants_mixtral(logits, k):
    p = _softmax(logits)
    ids = _topk(logits, k)
    g_all = _pick(p, ids)
    return [
        (f"gates sum to {g_all.sum(1).mean():.3g} on average, not 1: you took the softmax over ALL "
         f"{logits.shape[1]} experts and kept the top-k probabilities. Mixtral renormalises over the "
         f"top-k only: the softmax of the k selected logits (Jiang et al. 2024, eq. 1)", ids, g_all),
        ("you took the softmax over the k selected logits, but along the wrong axis (over tokens): "
         "softmax(selected, axis=-1)", ids, _softmax(_pick(logits, ids), axis=0)),
        ("your gates are the selected logits themselves: Mixtral's gates are their softmax",
         ids, _pick(logits, ids)),
    ]


def check_route_mixtral(route_mixtral):
    """route_mixtral(logits, k) -> (ids, gates): top-k of the logits, softmax over the k selected."""
    for preset in ("mixtral", "gpt_oss"):
        case, cfg, logits = _routing_case(preset)
        k = cfg["top_k"]
        before = logits.copy()
        out = route_mixtral(logits, k)
        _no_modification("logits", before, logits)
        if not isinstance(out, tuple) or len(out) != 2:
            _fail(f"{preset}: return a tuple (ids, gates), got {type(out).__name__}")
        label = f"{preset} (k={k})"
        _check_routing_output(label, case, *out, _variants_mixtral(logits, k))
        _ok(f"{label}: experts and gates of {logits.shape[0]} tokens match the golden case")


def _deepseek_v3(logits, bias, k, n_group, topk_group, scaling, *, group_score="top2_sum",
                 use_groups=True, gates_from="scores", renorm=True, scoring="sigmoid", mask=-np.inf):
    s = _sigmoid(logits) if scoring == "sigmoid" else _softmax(logits)
    biased = s + bias
    T, E = s.shape
    if use_groups:
        g = biased.reshape(T, n_group, E // n_group)
        score = np.sort(g, axis=-1)[..., -2:].sum(-1) if group_score == "top2_sum" else g.max(-1)
        keep = np.zeros((T, n_group), bool)
        np.put_along_axis(keep, _topk(score, topk_group), True, axis=1)
        ranked = np.where(np.repeat(keep, E // n_group, axis=1), biased, mask)
    else:
        ranked = biased
    ids = _topk(ranked, k)
    w = _pick(biased if gates_from == "biased" else s, ids)
    if renorm:
        w = w / (w.sum(1, keepdims=True) + 1e-20)
    return ids, w * scaling


def _variants_deepseek_v3(logits, bias, k, n_group, topk_group, scaling):
    args = (logits, bias, k, n_group, topk_group, scaling)
    return [
        ("your gates read the BIASED scores. The selection bias only decides which experts a token "
         "goes to; the gates are the unbiased sigmoid scores of those experts (DeepSeek-V3 sec. "
         "2.1.2, eq. 16: 'the bias term is only used for routing')",
         *_deepseek_v3(*args, gates_from="biased")),
        ("your experts ignore the group limit: DeepSeek-V3 first keeps the topk_group best of n_group "
         "groups (a group's score = the sum of its 2 best biased scores) and picks the top-k only "
         "among their experts", *_deepseek_v3(*args, use_groups=False)),
        ("your group score is the group's best expert (DeepSeek-V2's group_limited_greedy); "
         "DeepSeek-V3's noaux_tc scores a group by the SUM of its top-2 biased scores",
         *_deepseek_v3(*args, group_score="max")),
        (f"your gates sum to 1 per token: multiply by routed_scaling_factor = {scaling} after "
         f"renormalising", *_deepseek_v3(logits, bias, k, n_group, topk_group, 1.0)),
        ("your gates are not renormalised: DeepSeek-V3 divides the k selected scores by their sum "
         "(+1e-20) before the scaling factor", *_deepseek_v3(*args, renorm=False)),
        ("you used a softmax; DeepSeek-V3 scores each expert with a sigmoid (eq. 15)",
         *_deepseek_v3(*args, scoring="softmax")),
        ("your masked experts are 0, not -inf (Hugging Face's masked_fill(..., 0.0)): with a negative "
         "bias a masked expert can then beat every allowed one. Mask with -inf, as DeepSeek's code",
         *_deepseek_v3(*args, mask=0.0)),
    ]


def check_route_deepseek_v3(route_deepseek_v3):
    """route_deepseek_v3(logits, bias, k, n_group, topk_group, scaling) -> (ids, gates)."""
    case, cfg, logits = _routing_case("deepseek_v3")
    bias = case.inputs["param.selection_bias"].astype(np.float64)
    k, grp, scaling = cfg["top_k"], cfg["group"], cfg["gating"]["routed_scaling_factor"]
    args = (logits, bias, k, grp["n_group"], grp["topk_group"], scaling)
    before = logits.copy(), bias.copy()
    out = route_deepseek_v3(*args)
    _no_modification("logits", before[0], logits)
    _no_modification("bias", before[1], bias)
    if not isinstance(out, tuple) or len(out) != 2:
        _fail(f"return a tuple (ids, gates), got {type(out).__name__}")
    label = (f"deepseek_v3 (k={k}, {grp['topk_group']} of {grp['n_group']} groups, x{scaling})")
    _check_routing_output(label, case, *out, _variants_deepseek_v3(*args))
    _ok(f"{label}: experts and gates of {logits.shape[0]} tokens match the golden case")
    # A probe where the bias is negative everywhere: a zero mask would pick a forbidden expert.
    probe_logits = np.array([[3.0, 2.5, -1.0, -2.0, 0.0, 0.1, -3.0, -3.5]])
    probe_bias = np.full(8, -2.0)
    probe = (probe_logits, probe_bias, 2, 4, 1, 1.0)
    ids, gates = (np.asarray(a) for a in route_deepseek_v3(*probe))
    exp_ids, exp_gates = _deepseek_v3(*probe)
    if set(ids.ravel().tolist()) != set(exp_ids.ravel().tolist()):
        if set(ids.ravel().tolist()) == set(_deepseek_v3(*probe, mask=0.0)[0].ravel().tolist()):
            _fail("with a bias of -2 on every expert, you chose an expert from a group that was not "
                  "kept: masking the other groups with 0 (Hugging Face's masked_fill(..., 0.0)) "
                  "lets them beat allowed experts whose biased scores are negative. Mask with -inf")
        _fail(f"probe logits {probe_logits[0].tolist()}, bias -2, k=2, 1 of 4 groups: you chose "
              f"{sorted(ids.ravel().tolist())}, expected {sorted(exp_ids.ravel().tolist())}")
    _ok("a negative bias everywhere still keeps the choice inside the best group (-inf mask)")


# =================================================================================================
# Lab 2 -- load balancing
# =================================================================================================
def check_expert_load(expert_load):
    """expert_load(ids (T, k), num_experts) -> load (E,): token-expert pairs per expert."""
    ids = np.array([[0, 1], [1, 2], [1, 0], [2, 1]])
    got = _array("expert_load(ids, 6)", expert_load(ids, 6), kind="i")
    if got.shape != (6,):
        _fail(f"expert_load(ids, num_experts=6) has shape {got.shape}, expected (6,): experts 3, 4, 5 "
              f"got no pair but still need a 0 (np.bincount(ids.ravel(), minlength=num_experts))")
    if np.array_equal(got, np.bincount(ids[:, 0], minlength=6)):
        _fail("you counted only the first choice (ids[:, 0]); the load counts every (token, slot) "
              "pair: all k columns")
    if not np.array_equal(got, [2, 4, 2, 0, 0, 0]):
        _fail(f"ids {ids.tolist()}: load {got.tolist()}, expected [2, 4, 2, 0, 0, 0]")
    _ok("load counts every (token, slot) pair, empty experts included")


def _switch(probs, ids, alpha, f_norm="Tk", first_only=False, with_E=True, p_from="probs"):
    T, E = probs.shape
    k = ids.shape[1]
    cols = ids[:, :1] if first_only else ids
    counts = np.bincount(cols.ravel(), minlength=E).astype(np.float64)
    f = counts / (T * (1 if first_only else k) if f_norm == "Tk" else T)
    if p_from == "probs":
        P = probs.mean(0)
    else:
        P = np.zeros(E)
        np.add.at(P, ids.ravel(), _pick(probs, ids).ravel())
        P /= T
    return alpha * (E if with_E else 1) * float(np.sum(f * P))


def check_switch_aux_loss(switch_aux_loss):
    """switch_aux_loss(probs (T, E), ids (T, k), alpha) -> float (Switch Transformer eqs. 4-6)."""
    case = golden("losses.switch")
    probs = case.inputs["input.probs"].astype(np.float64)
    ids = case.inputs["input.ids"].astype(np.int64)
    alpha = case.config["alpha"]
    expected = float(case.expected["output.loss"])
    got = switch_aux_loss(probs.copy(), ids.copy(), alpha)
    if np.ndim(got) != 0:
        _fail(f"the loss is one number, got shape {np.shape(got)}: sum over the experts")
    got = float(got)
    k = ids.shape[1]
    if not math.isclose(got, expected, rel_tol=1e-6):
        variants = [
            (_switch(probs, ids, alpha, f_norm="T"),
             f"your loss is k = {k} times too large: f_i must be the FRACTION of the T*k assignments "
             f"(divide the counts by T*k), so that f sums to 1 and the loss is alpha at perfect balance "
             f"for any k. (Dividing by T is Hugging Face's convention: its loss is k times ours, "
             f"docs/losses.md)"),
            (_switch(probs, ids, alpha, first_only=True),
             "you counted only each token's first choice (GShard/DeepSpeed's top2gating does); count "
             "every (token, slot) assignment"),
            (_switch(probs, ids, alpha, with_E=False),
             f"missing the factor E = {probs.shape[1]}: loss = alpha * E * sum_i f_i P_i, so that it "
             f"equals alpha at perfect balance"),
            (_switch(probs, ids, alpha, p_from="gates"),
             "P_i must be the mean router probability of expert i over ALL tokens (probs.mean(axis=0)), "
             "not only over the tokens that selected it"),
        ]
        for value, message in variants:
            if math.isclose(got, value, rel_tol=1e-6):
                _fail(message)
        _fail(f"loss {got:.8g}, expected {expected:.8g} (alpha = {alpha}, T = {probs.shape[0]}, "
              f"E = {probs.shape[1]}, k = {k})")
    _ok(f"switch aux loss {got:.8g} matches the golden value (T = {probs.shape[0]}, E = "
        f"{probs.shape[1]}, k = {k}, alpha = {alpha})")
    E = 8
    balanced_ids = np.arange(16).reshape(8, 2) % E
    value = float(switch_aux_loss(np.full((8, E), 1.0 / E), balanced_ids, 0.01))
    if not math.isclose(value, 0.01, rel_tol=1e-9):
        _fail(f"at perfect balance (f_i = P_i = 1/E) the loss must be alpha = 0.01, got {value:.6g}")
    _ok("perfect balance gives alpha")


def check_bias_update(bias_update):
    """bias_update(bias (E,), load (E,), gamma) -> new bias: b_i + gamma * sign(mean load - load_i)."""
    case = golden("balancing.bias_update")
    bias = case.inputs["input.bias"].astype(np.float64)
    load = case.inputs["input.load"].astype(np.int64)
    gamma = case.config["gamma"]
    expected = case.expected["output.bias"]
    before = bias.copy()
    got = _array("bias_update(...)", bias_update(bias, load, gamma), shape=bias.shape)
    _no_modification("bias", before, bias)
    if not _close(got, expected, rtol=1e-6, atol=1e-9):
        mean = load.mean()
        e = np.sign(mean - load)
        tied = np.flatnonzero(load == mean)
        if _close(got, before - gamma * e):
            _fail("the sign is reversed: an OVERLOADED expert (load > mean) must get a LOWER bias so "
                  "that fewer tokens choose it: b += gamma * sign(mean_load - load)")
        if _close(got, before + gamma * (mean - load)):
            _fail("you moved the bias by gamma * (mean - load), proportional to the imbalance; "
                  "DeepSeek-V3 moves it by a fixed step: gamma * sign(mean - load)")
        if len(tied) and np.allclose(np.delete(got, tied), np.delete(expected, tied)):
            _fail(f"experts {tied.tolist()} have exactly the mean load ({mean:g}) and must keep their "
                  f"bias: sign(0) = 0 (you moved them by {got[tied[0]] - before[tied[0]]:+.3g})")
        i = _first_difference(got, expected)[0]
        _fail(f"expert {i} (load {load[i]}, mean {mean:g}): bias {got[i]:.6g}, expected {expected[i]:.6g}")
    _ok(f"bias update of {len(bias)} experts matches (gamma = {gamma}, loads equal to the mean unchanged)")


# =================================================================================================
# Lab 3 -- numerics
# =================================================================================================
def _bf16_rne(x):
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    out = rounded.view(np.float32).copy()
    nan = np.isnan(x)
    out[nan] = x[nan]
    return out


def check_round_to_bf16(round_to_bf16):
    """round_to_bf16(x float32 array) -> float32 array of bf16 values: round to nearest, ties to even."""
    case = golden("numerics.encode.bf16")
    values = case.inputs["input.values"].astype(np.float32)
    expected = case.expected["output.bits"].astype(np.float32)   # bf16 values as float32 (exact)
    before = values.copy()
    with np.errstate(all="ignore"):
        got = np.asarray(round_to_bf16(values.copy()))
    _no_modification("x", before, values)
    if got.shape != values.shape:
        _fail(f"round_to_bf16 returned shape {got.shape}, expected {values.shape}")
    if got.dtype != np.float32:
        _fail(f"round_to_bf16 returned dtype {got.dtype}: return float32 (bf16 values are float32 "
              f"values whose low 16 bits are 0)")
    same = (got == expected) & (np.signbit(got) == np.signbit(expected)) | (np.isnan(got) & np.isnan(expected))
    if not same.all():
        u = values.view(np.uint32)
        trunc = (u & 0xFFFF0000).view(np.float32)
        half_up = ((u.astype(np.uint64) + 0x8000) >> 16 << 16).astype(np.uint32).view(np.float32)
        i = int(np.flatnonzero(~same)[0])
        finite = ~np.isnan(values)
        if np.array_equal(got[finite], trunc[finite]):
            _fail(f"you truncated (dropped the low 16 bits): that rounds toward zero. bf16 rounds to "
                  f"NEAREST: e.g. {values[i]!r} -> {expected[i]!r}, you gave {got[i]!r}. Add 0x7FFF + "
                  f"(the lowest kept bit) before dropping the low half")
        if np.array_equal(got[finite], half_up[finite]):
            _fail(f"exact ties must round to EVEN, not up: {values[i]!r} is halfway between two bf16 "
                  f"values and goes to the one whose last mantissa bit is 0, {expected[i]!r} "
                  f"(you gave {got[i]!r}; 128.5 -> 128 and 129.5 -> 130 in bf16)")
        if np.isnan(values[i]):
            _fail(f"a NaN input must stay NaN (bits {values.view(np.uint32)[i]:#010x} -> you gave "
                  f"{got[i]!r}): adding the rounding increment to a NaN's bits can carry into the "
                  f"sign or turn it into inf; handle NaN apart")
        _fail(f"value {i}: {values[i]!r} (bits {values.view(np.uint32)[i]:#010x}) -> you gave "
              f"{got[i]!r}, bf16 round-to-nearest-even gives {expected[i]!r}")
    nans = np.array([0x7F800001, 0x7FFFFFFF, 0xFFC00001], np.uint32).view(np.float32)
    with np.errstate(all="ignore"):
        got = np.asarray(round_to_bf16(nans.copy()))
    if not np.all(np.isnan(got)):
        i = int(np.flatnonzero(~np.isnan(got))[0])
        _fail(f"a NaN input must stay NaN: bits {nans.view(np.uint32)[i]:#010x} -> you gave {got[i]!r}. "
              f"Adding the rounding increment to a NaN's bits can carry into the exponent (inf) or the "
              f"sign (-0.0): handle NaN apart (np.where(np.isnan(x), x, rounded))")
    _ok(f"{len(values)} values round exactly as moelab's bf16 (ties to even, overflow to inf, NaN kept)")


def _z_loss(logits, coef):
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    return coef * float(np.mean(lse ** 2))


def check_z_loss(z_loss):
    """z_loss(logits (T, E), coef) -> float: coef * mean_t (log sum_e exp logits[t, e])^2."""
    case = golden("losses.z_loss")
    logits = case.inputs["input.logits"].astype(np.float64)
    coef = case.config["alpha"]
    expected = float(case.expected["output.loss"])
    got = z_loss(logits.copy(), coef)
    if np.ndim(got) != 0:
        _fail(f"the z-loss is one number, got shape {np.shape(got)}: average over the tokens")
    got = float(got)
    if not math.isclose(got, expected, rel_tol=1e-6):
        m = logits.max(1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
        for value, message in [
            (coef * float(np.sum(lse ** 2)), "you summed over the tokens; ST-MoE's eq. 5 averages: "
             "(1/T) sum_t lse_t^2"),
            (coef * float(np.mean(lse)), "the log-sum-exp must be SQUARED: (log sum_e exp z_e)^2"),
            (coef * float(np.mean(lse)) ** 2, "square each token's log-sum-exp, then average "
             "(you squared the average)"),
            (coef * float(np.mean(np.log(np.exp(logits).mean(1)) ** 2)), "log of the SUM of the "
             "exponentials, not of their mean"),
            (coef * float(np.mean(logits.max(1) ** 2)), "you used the max logit; the z-loss uses "
             "the log-sum-exp (max + log sum exp(z - max))"),
        ]:
            if math.isclose(got, value, rel_tol=1e-6):
                _fail(message)
        _fail(f"z-loss {got:.8g}, expected {expected:.8g} (coef {coef}, T = {logits.shape[0]})")
    _ok(f"z-loss {got:.8g} matches the golden value")
    big = np.array([[1000.0, 1000.0, 0.0]])
    with np.errstate(all="ignore"):
        value = float(z_loss(big, 1.0))
    exact = (1000 + math.log(2)) ** 2
    if not math.isfinite(value):
        _fail(f"z_loss of logits [1000, 1000, 0] is {value}: exp(1000) overflows. Compute the "
              f"log-sum-exp stably, m + log(sum exp(z - m)) with m the row max (= 1000 + ln 2)")
    if not math.isclose(value, exact, rel_tol=1e-9):
        _fail(f"z_loss([[1000, 1000, 0]], coef 1) = {value:.10g}, expected (1000 + ln 2)^2 = {exact:.10g}")
    _ok("stable for logits of 1000 (the log-sum-exp subtracts the max)")


# =================================================================================================
# Lab 4 -- capacity and dropping
# =================================================================================================
def _capacity(T, k, E, factor):
    q = factor * (T * k) / E
    nearest = round(q)
    if abs(q - nearest) <= 4 * np.finfo(float).eps * q:
        q = nearest
    return int(min(math.ceil(q), T * k))


def check_capacity(capacity):
    """capacity(tokens, k, num_experts, factor) -> int: ceil(factor * T * k / E), at most T * k."""
    cases = [(16, 1, 8, 1.25), (16, 2, 8, 0.5), (64, 2, 8, 1.0), (10, 2, 4, 1.0), (100, 1, 8, 1.0),
             (50, 2, 10, 1.1), (4, 2, 2, 10.0), (0, 2, 8, 1.0)]
    for T, k, E, f in cases:
        got = capacity(T, k, E, f)
        if isinstance(got, (float, np.floating)) and float(got) != int(got):
            _fail(f"capacity({T}, {k}, {E}, {f}) = {got}: a capacity is a whole number of pairs")
        try:
            got = int(got)
        except (TypeError, ValueError):
            _fail(f"capacity({T}, {k}, {E}, {f}) returned {got!r}, not a number")
        expected = _capacity(T, k, E, f)
        if got == expected:
            continue
        q = f * T * k / E
        if got > T * k and expected == T * k:
            _fail(f"capacity(T={T}, k={k}, E={E}, factor={f}) = {got}, more than the T * k = {T * k} "
                  f"pairs that exist: cap it at T * k (moelab does), or memory is reserved for nothing")
        if got == math.floor(q) or got == int(q):
            _fail(f"capacity(T={T}, k={k}, E={E}, factor={f}) = {got}: you rounded {q:g} DOWN; the "
                  f"capacity is ceil(factor * T * k / E) = {expected} (Switch, GShard): rounding down "
                  f"drops pairs even at factor 1 with a perfectly balanced batch")
        if got == math.ceil(f * T / E) or got == math.floor(f * T / E):
            _fail(f"capacity(T={T}, k={k}, E={E}, factor={f}) = {got}: you forgot k. Each token "
                  f"offers k pairs, so the average expert receives T * k / E of them: "
                  f"ceil(factor * T * k / E) = {expected}")
        if got == math.ceil(q) and got == expected + 1:
            _fail(f"capacity(T={T}, k={k}, E={E}, factor={f}) = {got}, expected {expected}: in floating "
                  f"point {f} * {T * k} / {E} = {q!r}, and ceil() of that is {math.ceil(q)}. The "
                  f"factor 1.1 has no exact binary value. moelab snaps a quotient within 4 ulps of a "
                  f"whole number to it before the ceil (reference/math.h, snap_to_whole)")
        _fail(f"capacity(T={T}, k={k}, E={E}, factor={f}) = {got}, expected {expected}")
    _ok(f"{len(cases)} capacities match (ceil, k counted, 1.1 * 100 / 10 = 11, capped at T * k)")


def _keep(ids, E, capacity, order="slot_major", cmp="lt"):
    T, k = ids.shape
    keep = np.zeros((T, k), np.int64)
    fill = np.zeros(E, np.int64)
    pairs = ([(t, j) for j in range(k) for t in range(T)] if order == "slot_major"
             else [(t, j) for t in range(T) for j in range(k)])
    for t, j in pairs:
        e = ids[t, j]
        if fill[e] < capacity or (cmp == "le" and fill[e] <= capacity):
            fill[e] += 1
            keep[t, j] = 1
    return keep


def check_keep_arrival_order(keep_arrival_order):
    """keep_arrival_order(ids (T, k), num_experts, capacity) -> keep (T, k) of 0/1: pairs in
    arrival order (all first choices in token order, then all second choices, ...), each expert
    keeps at most `capacity` of them."""
    for name in ("capacity.arrival_order", "capacity.overflow"):
        case = golden(name)
        ids = case.inputs["input.ids"].astype(np.int64)
        E = case.config["num_experts"]
        cap = int(case.expected["output.capacity"][0])
        expected = case.expected["output.keep"].astype(np.int64)
        before = ids.copy()
        got = _array("keep", keep_arrival_order(ids, E, cap), shape=ids.shape, kind="b",
                     what="(tokens, k): 1 = kept")
        _no_modification("ids", before, ids)
        if np.array_equal(got, expected):
            _ok(f"{name}: the kept pairs of {ids.shape[0]} tokens x {ids.shape[1]} slots match "
                f"(capacity {cap})")
            continue
        kept = np.bincount(ids[got == 1], minlength=E)
        if np.array_equal(got, _keep(ids, E, cap, cmp="le")) or kept.max() > cap:
            e = int(np.argmax(kept))
            _fail(f"{name}: expert {e} kept {kept[e]} pairs with capacity {cap}: off by one. Keep a "
                  f"pair while the expert holds FEWER than `capacity` (fill < capacity), then count it")
        if np.array_equal(got, _keep(ids, E, cap, order="token_major")):
            t, j = np.argwhere(got != expected)[0]
            _fail(f"{name}: you go token by token (token 0's slots, then token 1's, ...). GShard and "
                  f"moelab's arrival order is slot-major: every token's FIRST choice before any "
                  f"second choice, so a token's first choice is not dropped to make room for an "
                  f"earlier token's second choice (token {t}, slot {j} differs)")
        t, j = np.argwhere(got != expected)[0]
        _fail(f"{name}: token {t}, slot {j} (expert {ids[t, j]}): keep = {got[t, j]}, expected "
              f"{expected[t, j]} (capacity {cap})")


# =================================================================================================
# Lab 5 -- specialisation
# =================================================================================================
def _mi(counts):
    p = counts / counts.sum()
    pd, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / (pd @ pe)[nz])))


def check_mutual_information(mutual_information):
    """mutual_information(counts (D, E)) -> I(domain; expert) in nats, from a table of pair counts."""
    rng = np.random.default_rng(5)
    tables = {
        "independent": np.outer([10, 20, 30], [1, 2, 3, 4]).astype(np.float64),
        "one expert per domain": np.diag([50.0, 50.0, 50.0]),
        "random": rng.integers(0, 40, (9, 8)).astype(np.float64),
        "with an empty expert": np.array([[5.0, 0.0, 3.0], [1.0, 0.0, 7.0]]),
    }
    for name, counts in tables.items():
        before = counts.copy()
        with np.errstate(all="ignore"):
            got = mutual_information(counts)
        _no_modification("counts", before, counts)
        if np.ndim(got) != 0:
            _fail(f"{name}: return one number, got shape {np.shape(got)}")
        got = float(got)
        expected = _mi(counts)
        if math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12):
            continue
        if math.isnan(got):
            _fail(f"{name}: NaN. A cell with 0 pairs contributes 0 (p log p -> 0): sum only over p > 0")
        if math.isclose(got, expected / math.log(2), rel_tol=1e-9):
            _fail(f"{name}: {got:.6g} is in bits (log2); return nats (natural log), {expected:.6g}")
        if math.isclose(got, -expected, rel_tol=1e-9):
            _fail(f"{name}: the sign is reversed: I = sum p(d,e) log(p(d,e) / (p(d) p(e))) >= 0")
        _fail(f"{name} table {counts.astype(int).tolist()}: I = {got:.6g} nats, expected {expected:.6g}")
    _ok("independent -> 0, one expert per domain -> log 3, random tables and empty experts match")


def check_flip_bit_bf16(flip_bit_bf16):
    """flip_bit_bf16(x float32 scalar/array of bf16 values, bit) -> the value with bit `bit` of its
    bf16 pattern inverted (bit 0 = last mantissa bit, 14 = top exponent bit, 15 = sign)."""
    values = np.array([1.0, 0.5, -2.25, 0.0, 3.140625], np.float32)
    for bit in (0, 6, 7, 14, 15):
        with np.errstate(all="ignore"):
            got = np.asarray(flip_bit_bf16(values.copy(), bit), np.float32)
        u = values.view(np.uint32) >> 16
        expected = ((u ^ (1 << bit)).astype(np.uint32) << 16).view(np.float32)
        if got.shape != values.shape:
            _fail(f"bit {bit}: shape {got.shape}, expected {values.shape}")
        same = (got == expected) & (np.signbit(got) == np.signbit(expected)) | (np.isnan(got) & np.isnan(expected))
        if not same.all():
            i = int(np.flatnonzero(~same)[0])
            wrong16 = (((values.view(np.uint32) ^ (1 << bit))).view(np.float32))[i]
            if got[i] == wrong16:
                _fail(f"bit {bit} of {values[i]!r}: you flipped bit {bit} of the float32 pattern. A "
                      f"bf16 value is the TOP 16 bits of a float32: bf16 bit b is float32 bit b + 16")
            _fail(f"bit {bit} of {values[i]!r} (bf16 {int(u[i]):#06x}): got {got[i]!r}, expected "
                  f"{expected[i]!r} ({int(u[i] ^ (1 << bit)):#06x})")
    _ok("bit flips of bf16 values match (mantissa, exponent, sign)")


# =================================================================================================
# Lab 6 -- kernels: dispatch, grouped GEMM, combine
# =================================================================================================
def _plan(ids, keep, E):
    T, k = ids.shape
    pairs = [(t, j) for t in range(T) for j in range(k) if keep[t, j]]
    counts = np.bincount([ids[t, j] for t, j in pairs], minlength=E).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    order = sorted(range(len(pairs)), key=lambda i: (ids[pairs[i]], i))   # stable by expert
    row_token = np.array([pairs[i][0] for i in order], np.int64)
    row_slot = np.array([pairs[i][1] for i in order], np.int64)
    return counts, offsets, row_token, row_slot


def check_dispatch_plan(dispatch_plan):
    """dispatch_plan(ids (T, k), keep (T, k), num_experts) -> (counts (E,), offsets (E+1,),
    row_token (N,), row_slot (N,)): the kept pairs in expert-major order (counting sort)."""
    case = golden("dispatch.permute")
    ids = case.inputs["input.ids"].astype(np.int64)
    keep = case.inputs["input.keep"].astype(np.int64)
    E = case.expected["output.counts"].shape[0]
    out = dispatch_plan(ids.copy(), keep.copy(), E)
    if not isinstance(out, tuple) or len(out) != 4:
        _fail("return a tuple (counts, offsets, row_token, row_slot)")
    counts, offsets, row_token, row_slot = out
    ref = _plan(ids, keep, E)
    counts = _array("counts", counts, kind="i")
    if counts.shape != (E,):
        _fail(f"counts has shape {counts.shape}, expected ({E},): one per expert, empty experts "
              f"included (expert 5 gets no pair here): np.bincount(..., minlength=E)")
    if np.array_equal(counts, np.bincount(ids.ravel(), minlength=E)) and not np.array_equal(counts, ref[0]):
        _fail(f"counts {counts.tolist()} include the DROPPED pairs (keep = 0): count only kept pairs, "
              f"expected {ref[0].tolist()}")
    if not np.array_equal(counts, ref[0]):
        _fail(f"counts {counts.tolist()}, expected {ref[0].tolist()}")
    _ok(f"counts per expert {counts.tolist()}")
    offsets = _array("offsets", offsets, kind="i")
    if offsets.shape == (E,) and np.array_equal(offsets, ref[1][1:]):
        _fail("offsets are the INCLUSIVE prefix sum (where each block ends). Expert e's rows are "
              "[offsets[e], offsets[e+1]): E + 1 entries, starting at 0 (an exclusive prefix sum, "
              "then the total)")
    if offsets.shape == (E,) and np.array_equal(offsets, ref[1][:-1]):
        _fail(f"offsets has {E} entries; give E + 1, the last one = N = {ref[1][-1]} rows, so that "
              f"expert E-1's block is [offsets[E-1], offsets[E])")
    if offsets.shape != (E + 1,) or not np.array_equal(offsets, ref[1]):
        _fail(f"offsets {offsets.tolist()}, expected {ref[1].tolist()}")
    _ok(f"offsets {offsets.tolist()} (exclusive prefix sum, E + 1 entries)")
    N = int(ref[1][-1])
    row_token = _array("row_token", row_token, shape=(N,), kind="i", what="one row per kept pair")
    row_slot = _array("row_slot", row_slot, shape=(N,), kind="i")
    experts_of_rows = ids[row_token, row_slot]
    for e in range(E):
        block = slice(ref[1][e], ref[1][e + 1])
        if np.any(experts_of_rows[block] != e):
            r = ref[1][e] + int(np.argmax(experts_of_rows[block] != e))
            _fail(f"row {r} is in expert {e}'s block [{ref[1][e]}, {ref[1][e + 1]}) but its pair "
                  f"(token {row_token[r]}, slot {row_slot[r]}) goes to expert {experts_of_rows[r]}: "
                  f"rows must be grouped by expert (sort the pairs by expert id)")
    if np.any(keep[row_token, row_slot] == 0):
        r = int(np.argmax(keep[row_token, row_slot] == 0))
        _fail(f"row {r} is the dropped pair (token {row_token[r]}, slot {row_slot[r]}): skip keep == 0")
    report = mg.compare(case, {"output.counts": counts, "output.offsets": offsets,
                               "output.row_token": row_token})
    if not report.ok:
        _fail("dispatch.permute golden case: " + "; ".join(c.message for c in report.checks if c.verdict == "fail"))
    if not (np.array_equal(row_token, ref[2]) and np.array_equal(row_slot, ref[3])):
        print("  (your rows are grouped correctly but ordered differently inside an expert's block; "
              "that is allowed, moelab keeps (token, slot) order: a stable counting sort)")
    _ok(f"{N} rows in expert-major order, every kept pair once (golden case dispatch.permute: "
        f"{report.verdict})")


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _layer_case():
    case = golden("mixtral.layer.fp32")
    p = {k[len("param."):]: v.astype(np.float64) for k, v in case.inputs.items() if k.startswith("param.")}
    return case, case.inputs["input.x"].astype(np.float64), p


def check_grouped_swiglu(grouped_swiglu):
    """grouped_swiglu(x (T, C), row_token (N,), offsets (E+1,), w_gate (E, H, C), w_up (E, H, C),
    w_down (E, C, H)) -> expert_out (N, C): row r = FFN_e(x[row_token[r]]) for the expert e whose
    block holds r, FFN(x) = (silu(x W_g^T) * (x W_u^T)) W_d^T."""
    case, x, p = _layer_case()
    E = case.expected["output.counts"].shape[0]
    w_gate = np.stack([p[f"experts.{e}.w_gate"] for e in range(E)])
    w_up = np.stack([p[f"experts.{e}.w_up"] for e in range(E)])
    w_down = np.stack([p[f"experts.{e}.w_down"] for e in range(E)])
    row_token = case.expected["output.row_token"].astype(np.int64)
    offsets = case.expected["output.offsets"].astype(np.int64)
    expected = case.expected["output.expert_out"]
    got = _array("expert_out", grouped_swiglu(x.copy(), row_token, offsets, w_gate, w_up, w_down),
                 shape=expected.shape, what="(rows N, hidden C)")
    if not _close(got, expected, rtol=1e-5, atol=1e-7):
        e_of = np.repeat(np.arange(E), np.diff(offsets))
        xr = x[row_token]
        def ffn(gate_act, up_act=lambda v: v, swap=False):
            out = np.empty_like(expected)
            for r in range(len(row_token)):
                e = e_of[r]
                g, u = xr[r] @ w_gate[e].T, xr[r] @ w_up[e].T
                if swap:
                    g, u = u, g
                out[r] = (gate_act(g) * up_act(u)) @ w_down[e].T
            return out
        for value, message in [
            (ffn(_silu, swap=True), "you applied SiLU to the UP projection; SwiGLU applies it to the "
             "GATE projection: silu(x W_gate^T) * (x W_up^T)"),
            (ffn(lambda v: np.maximum(v, 0)), "ReLU where SwiGLU has SiLU: silu(v) = v * sigmoid(v)"),
            (ffn(_sigmoid), "sigmoid(v) is not silu(v): silu(v) = v * sigmoid(v)"),
            (ffn(lambda v: v), "the gate projection goes through SiLU: silu(x W_gate^T) * (x W_up^T)"),
        ]:
            if _close(got, value, rtol=1e-5, atol=1e-7):
                _fail(message)
        t = _first_difference(got, expected, rtol=1e-5, atol=1e-7)
        r = t[0]
        _fail(f"row {r} (token {row_token[r]}, expert {e_of[r]}): column {t[1]} is {got[t]:.6g}, "
              f"expected {expected[t]:.6g}")
    report = mg.compare(case, {"output.expert_out": got})
    if not report.ok:
        _fail("mixtral.layer.fp32: " + "; ".join(c.message for c in report.checks if c.verdict == "fail"))
    _ok(f"{expected.shape[0]} expert rows match the golden Mixtral layer (SwiGLU experts)")


def check_combine(combine):
    """combine(expert_out (N, C), row_token (N,), row_weight (N,), num_tokens) -> y (T, C):
    y_t = sum over the rows r of token t of row_weight[r] * expert_out[r]."""
    case = golden("combine.weighted_sum")
    out = case.inputs["input.expert_out"].astype(np.float64)
    row_token = case.inputs["input.row_token"].astype(np.int64)
    w = case.inputs["input.row_weight"].astype(np.float64)
    expected = case.expected["output.y"]
    T = expected.shape[0]
    got = _array("y", combine(out.copy(), row_token.copy(), w.copy(), T), shape=expected.shape,
                 what="(tokens, hidden): token 9 has no row and must be 0")
    if not _close(got, expected, rtol=1e-6, atol=1e-9):
        buffered = np.zeros_like(expected)
        buffered[row_token] += w[:, None] * out
        if _close(got, buffered):
            t = int(np.argmax(np.bincount(row_token, minlength=T)))
            _fail(f"token {t} has {np.sum(row_token == t)} rows but your y holds only one of them: "
                  f"`y[row_token] += ...` with a repeated index adds ONCE (numpy buffers fancy-index "
                  f"assignments). Use np.add.at(y, row_token, w[:, None] * expert_out), or a loop")
        unweighted = np.zeros_like(expected)
        np.add.at(unweighted, row_token, out)
        if _close(got, unweighted):
            _fail("you summed the expert outputs without their gates: y_t = sum_r row_weight[r] * out[r]")
        t = _first_difference(got, expected)
        _fail(f"first difference at {_where(t)}: {got[t]:.6g}, expected {expected[t]:.6g}")
    _ok(f"combine of {len(row_token)} rows into {T} tokens matches (a token without rows stays 0)")


# =================================================================================================
# Lab 7 -- scale
# =================================================================================================
def check_expert_params(expert_params):
    """expert_params(hidden, intermediate, activation) -> parameters of one expert (no biases)."""
    for C, H, act, expected in [(7168, 2048, "swiglu", 44_040_192), (4096, 14336, "swiglu", 176_160_768),
                                (768, 3072, "relu", 4_718_592)]:
        got = expert_params(C, H, act)
        if int(got) == expected:
            continue
        if act == "swiglu" and int(got) == 2 * C * H:
            _fail(f"expert_params({C}, {H}, 'swiglu') = {int(got):,}: the classic two-matrix FFN. A "
                  f"SwiGLU expert has THREE matrices, gate, up and down: 3 * C * H = {expected:,} "
                  f"(the 29.4M often quoted for DeepSeek-V3 is this mistake, docs/accounting.md)")
        if int(got) == C * H:
            _fail(f"expert_params({C}, {H}, {act!r}) = {int(got):,}: one matrix; count all of them")
        _fail(f"expert_params({C}, {H}, {act!r}) = {got}, expected {expected:,}")
    _ok("one expert: DeepSeek-V3 44,040,192, Mixtral 176,160,768, Switch-Base 4,718,592")


def check_total_and_active(total_and_active, sizes: dict, expected_total: int, expected_active: int,
                           name: str):
    """total_and_active(sizes) -> (total, active) of a model; expected values from moelab."""
    out = total_and_active(sizes)
    if not isinstance(out, tuple) or len(out) != 2:
        _fail("return a tuple (total, active)")
    total, active = (int(v) for v in out)
    s = sizes
    per_expert = 3 * s["hidden"] * s["expert_intermediate"]
    moe_layers = s["layers"] - s["dense_layers"]
    if total != expected_total:
        diff = total - expected_total
        if diff == -moe_layers * s["shared_experts"] * per_expert:
            _fail(f"{name}: total {total:,} is missing the shared experts ({s['shared_experts']} per "
                  f"MoE layer, {moe_layers} layers)")
        if diff == -s["dense_layers"] * 3 * s["hidden"] * s["dense_intermediate"] and s["dense_layers"]:
            _fail(f"{name}: total {total:,} is missing the {s['dense_layers']} dense FFN layers")
        if diff == -s["vocab"] * s["hidden"] or diff == -2 * s["vocab"] * s["hidden"]:
            _fail(f"{name}: total {total:,} is missing the embedding and/or output head "
                  f"(V x C = {s['vocab'] * s['hidden']:,} each, untied)")
        if diff == -moe_layers * s["experts"] * per_expert // 3:
            _fail(f"{name}: your experts have two matrices; SwiGLU has three (gate, up, down)")
        _fail(f"{name}: total {total:,}, moelab counts {expected_total:,} (difference {diff:+,})")
    if active != expected_active:
        diff = active - expected_active
        if diff == s["vocab"] * s["hidden"]:
            _fail(f"{name}: active {active:,} includes the input embedding table. A token reads one "
                  f"row of it (a lookup, not a product), so moelab's `active_params` leaves it out, as "
                  f"DeepSeek and OpenAI count. (Mistral and Qwen publish the count WITH it: "
                  f"`active_params_with_embedding`; say which convention you use)")
        if diff == -s["vocab"] * s["hidden"]:
            _fail(f"{name}: active {active:,} leaves out the output head: every token multiplies by it")
        if diff == -moe_layers * s["shared_experts"] * per_expert:
            _fail(f"{name}: active {active:,} leaves out the shared experts: every token runs them")
        if diff == moe_layers * (s["experts"] - s["top_k"]) * per_expert:
            _fail(f"{name}: active {active:,} counts every routed expert; a token runs only top_k = "
                  f"{s['top_k']} of the {s['experts']} in each MoE layer")
        _fail(f"{name}: active {active:,}, moelab counts {expected_active:,} (difference {diff:+,})")
    _ok(f"{name}: total {total:,} and active {active:,} match moelab's count")


def lab_account(preset: str) -> dict:
    """moelab's count of a published model (`moelab params --preset NAME --json`)."""
    if preset not in _ACCOUNTS:
        _ACCOUNTS[preset] = cli("params", "--preset", preset)
    return copy.deepcopy(_ACCOUNTS[preset])


_ACCOUNTS: dict = {}


def lab_sizes(preset: str) -> dict:
    """The sizes lab 7's total_and_active() reads, from moelab's count. Attention (MLA or GQA), the
    routers and the norms are given as moelab counts them: the exercise is the experts."""
    a = lab_account(preset)
    s = a["sizes"]
    return {"vocab": s["vocab_size"], "hidden": s["hidden_size"], "tied": s["tie_word_embeddings"],
            "layers": s["num_layers"], "dense_layers": a["layers"]["dense_ffn"],
            "dense_intermediate": s["intermediate_size"], "experts": s["n_routed_experts"],
            "top_k": s["top_k"], "shared_experts": s["n_shared_experts"],
            "expert_intermediate": s["moe_intermediate_size"],
            "attention_per_layer": a["per_unit"]["attention_per_layer"],
            "router_per_layer": a["per_unit"]["router_per_layer"], "norms": a["parts"]["norms"]["total"]}
