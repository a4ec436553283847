#!/usr/bin/python3
"""The independent oracle for moelab's dense transformer pieces and optimiser
(reference/transformer.h, reference/optim.h): every case that moelab_dump_transformer_cases wrote is
recomputed here in PyTorch from its inputs and configuration alone, the way Hugging Face's Llama
and PyTorch write it, and compared with moelab's outputs.

    /usr/bin/python3 transformer_oracle.py CASES_DIR_OR_FILE...          (Debian's python3 with python3-torch)
    /usr/bin/python3 transformer_oracle.py --self-test CASES_DIR_OR_FILE...

Components:
  attention  Llama self-attention: F.linear projections, view(B, T, H, D).transpose(1, 2), RoPE with
             rotate_half and cos/sin of cat(freqs, freqs), q k^T / sqrt(D) plus a -inf upper
             triangle, torch.softmax, (P v).transpose(1, 2).reshape(B, T, C), o_proj; gradients by
             torch.autograd of sum(dy * y). Float64, with RoPE's angles in float64 too (HF computes
             them in float32: that rounding is not what is being checked).
  block      F.embedding -> LlamaRMSNorm -> attention + residual -> LlamaRMSNorm -> F.linear (lm_head)
             -> F.cross_entropy; gradients of the loss by autograd. Float64.
  adamw      torch.optim.AdamW (two parameter groups: the matrix decayed, the vector not) with
             torch.nn.utils.clip_grad_norm_ before each step and the learning rate of each step set
             from the schedule's definition (linear warm-up lr (s + 1) / warmup, then cosine to
             min_lr), written here from reference/optim.h's statement of it. Float32, as in training.

Tolerances. Float64 cases: both sides evaluate the same formulas in another order (BLAS against
Eigen, the softmax and the norms' reductions), a few hundred roundings of 2^-53 at most, so values
agree to ~1e-14: |moelab - oracle| <= 1e-12 + 1e-10 |oracle| elementwise for forward values, and
max |moelab - oracle| <= 1e-9 max(|moelab|, |oracle|) per gradient tensor (a gradient can be 0 where
nothing depends on an input, and there no elementwise bound makes sense). Float32 (adamw): each step
rounds a handful of float32 operations (2^-24 = 6e-8 relative each) in another order than PyTorch's
vectorised kernels, PyTorch sums the clipping norm in float32 and moelab in double, over at most 8
steps: the norm and the clipped gradients must agree to 1e-6 relative (~16 ulps; they differ by
~2e-7), the parameters to 1e-7 + 1e-6 |oracle| (the 1e-7, one ulp of the parameters' scale of 1,
for values near 0), the moments to 1e-6 of each tensor's largest element (an element of m near 0 is
the difference of rounded terms of the tensor's scale), the learning rate (double arithmetic on both
sides) to 1e-14 relative. A real error (a missing bias correction, decay applied to the vector, an lr
one step off) moves values by 1e-5 or more.

Prints one line per case (PASS / FAIL) with the worst error relative to its tolerance, and
"N passed, M failed". Exits 1 if any case failed (or none was found), 77 if torch cannot be imported
(ctest's SKIP_RETURN_CODE), 0 otherwise. --self-test mutates each compared value of moelab's
outputs slightly and requires every mutation to fail in the field it changed.
"""

import copy
import json
import math
import pathlib
import sys

try:
    import torch
    import torch.nn.functional as F
except Exception as error:  # ImportError, or a broken installation
    print(f"transformer_oracle: SKIP: cannot import torch ({error!r}); run it with Debian's /usr/bin/python3 "
          f"and its python3-torch (tools/setup.sh installs it). This interpreter: {sys.executable}")
    sys.exit(77)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from routing_oracle import case_files  # noqa: E402  (the oracles' one reader of a case folder)

ATOL, RTOL = 1e-12, 1e-10      # float64 forward values, elementwise
GRAD_RTOL = 1e-9               # float64 gradients, relative to the tensor's largest component
F32_RTOL = 1e-6                # float32 (adamw): about 16 float32 ulps of the value ...
F32_ATOL = 1e-7                # ... plus about one ulp of the parameters' scale (~1), for values near 0
LR_RTOL = 1e-14                # the learning rate, computed in double by both


def number(v):
    """JSON numbers, and moelab's json_number strings "nan", "inf", "-inf"."""
    return float(v) if isinstance(v, str) else v


def tensor(v, dtype=torch.float64):
    def convert(x):
        return [convert(y) for y in x] if isinstance(x, list) else number(x)
    return torch.tensor(convert(v), dtype=dtype)


class Report:
    def __init__(self):
        self.failures = []
        self.worst = (-1.0, "no values compared")  # (fraction of the tolerance, message)

    def fail(self, message):
        self.failures.append(message)

    def note(self, fraction, message):
        if fraction > self.worst[0]:
            self.worst = (fraction, message)

    def shape(self, name, moelab, oracle):
        if tuple(moelab.shape) != tuple(oracle.shape):
            self.fail(f"{name}: shape {tuple(moelab.shape)}, expected {tuple(oracle.shape)}")
            return False
        if torch.isnan(moelab).any():
            self.fail(f"{name}: NaN at {torch.isnan(moelab).nonzero()[0].tolist()}")
            return False
        return True

    def values(self, name, moelab, oracle, atol=ATOL, rtol=RTOL):
        """Elementwise |moelab - oracle| <= atol + rtol |oracle|."""
        moelab, oracle = moelab.double(), oracle.detach().double()
        if not self.shape(name, moelab, oracle) or moelab.numel() == 0:
            return
        bound = atol + rtol * oracle.abs()
        ratio = (moelab - oracle).abs() / bound
        worst = int(torch.argmax(ratio))
        where = []
        for size in reversed(ratio.shape):  # the flat index as (row, column, ...)
            where.insert(0, worst % size)
            worst //= size
        worst = int(torch.argmax(ratio))
        fraction = float(ratio.flatten()[worst])
        message = (f"{name}{where}: moelab {float(moelab.flatten()[worst])!r}, "
                   f"oracle {float(oracle.flatten()[worst])!r}")
        self.note(fraction, message)
        if not fraction <= 1.0:
            self.fail(f"{message}: differ by {fraction:.3g} times the tolerance")

    def gradient(self, name, moelab, oracle, rtol=GRAD_RTOL):
        """max |moelab - oracle| <= rtol max(|moelab|, |oracle|) over the tensor."""
        moelab, oracle = moelab.double(), oracle.detach().double()
        if not self.shape(name, moelab, oracle) or moelab.numel() == 0:
            return
        scale = max(float(moelab.abs().max()), float(oracle.abs().max()))
        error = (moelab - oracle).abs()
        worst = int(torch.argmax(error))
        fraction = float(error.flatten()[worst]) / (rtol * scale) if scale > 0 else float(error.max()) / 1e-300
        message = (f"{name}[flat {worst}]: moelab {float(moelab.flatten()[worst])!r}, "
                   f"oracle {float(oracle.flatten()[worst])!r} (scale {scale:.3g})")
        self.note(fraction, message)
        if not fraction <= 1.0:
            self.fail(f"{message}: differ by {fraction:.3g} times the tolerance")


# ---- Hugging Face Llama, written the way modeling_llama.py writes it ------------------------------

def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(T, D, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                               # (T, D)
    return emb.cos(), emb.sin()


def llama_attention(x, q_proj, k_proj, v_proj, o_proj, B, T, H, theta):
    """x (B*T, C) sequence-major. Returns y (B*T, C) and, in moelab's layouts, q and k after RoPE
    and v (B*T, C) and the probabilities (B*H*T, T)."""
    C = x.shape[-1]
    D = C // H
    hidden = x.view(B, T, C)
    q = F.linear(hidden, q_proj).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = F.linear(hidden, k_proj).view(B, T, H, D).transpose(1, 2)
    v = F.linear(hidden, v_proj).view(B, T, H, D).transpose(1, 2)
    cos, sin = rope_cos_sin(T, D, theta)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
    causal = torch.full((T, T), float("-inf"), dtype=x.dtype).triu(1)
    probs = torch.softmax(scores + causal, dim=-1)
    context = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, C)
    y = F.linear(context, o_proj).reshape(B * T, C)
    flat = lambda t: t.transpose(1, 2).reshape(B * T, C)  # noqa: E731
    return y, flat(q), flat(k), flat(v), probs.reshape(B * H * T, T)


def llama_rmsnorm(x, weight, eps):
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


# ---- the checks -------------------------------------------------------------------------------------

def leaf(v):
    return tensor(v).requires_grad_(True)


def check_attention(case, report):
    c = case["config"]
    B, T, H, theta = c["batch_size"], c["seq_len"], c["n_heads"], c["rope_theta"]
    x = leaf(case["x"])
    weights = {name: leaf(case[name]) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    y, q, k, v, probs = llama_attention(x, weights["q_proj"], weights["k_proj"], weights["v_proj"],
                                        weights["o_proj"], B, T, H, theta)
    for name, oracle in (("y", y), ("q", q), ("k", k), ("v", v), ("probs", probs)):
        report.values(name, tensor(case[name]), oracle)
    (y * tensor(case["dy"])).sum().backward()
    report.gradient("dx", tensor(case["dx"]), x.grad)
    for name, w in weights.items():
        report.gradient("d_" + name, tensor(case["d_" + name]), w.grad)


def check_block(case, report):
    c = case["config"]
    B, T, H, theta, eps = c["batch_size"], c["seq_len"], c["n_heads"], c["rope_theta"], c["rms_norm_eps"]
    ids = torch.tensor(case["ids"], dtype=torch.long)
    targets = torch.tensor(case["targets"], dtype=torch.long)
    names = ("embed_tokens", "input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "norm", "lm_head")
    p = {name: leaf(case[name]) for name in names}
    x = F.embedding(ids, p["embed_tokens"])
    attention, _, _, _, _ = llama_attention(llama_rmsnorm(x, p["input_layernorm"], eps), p["q_proj"], p["k_proj"],
                                            p["v_proj"], p["o_proj"], B, T, H, theta)
    h = x + attention
    logits = F.linear(llama_rmsnorm(h, p["norm"], eps), p["lm_head"])
    loss = F.cross_entropy(logits, targets)
    report.values("logits", tensor(case["logits"]), logits)
    report.values("loss", tensor(case["loss"]), loss)
    loss.backward()
    for name in names:
        report.gradient("d_" + name, tensor(case["d_" + name]), p[name].grad)


def schedule_lr(step, lr, min_lr, warmup, total):
    """reference/optim.h's definition (nanoGPT's get_lr with a (step + 1) / warmup warm-up)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    ratio = (step - warmup) / (total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def check_adamw(case, report):
    c = case["config"]
    w = tensor(case["w"], torch.float32).requires_grad_(True)
    b = tensor(case["b"], torch.float32).requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": [w], "weight_decay": c["weight_decay"]},
                                   {"params": [b], "weight_decay": 0.0}],
                                  lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"])
    for s, step in enumerate(case["steps"]):
        w.grad = tensor(step["grad_w"], torch.float32)
        b.grad = tensor(step["grad_b"], torch.float32)
        lr = schedule_lr(s, c["schedule_lr"], c["min_lr"], c["warmup_steps"], c["total_steps"])
        report.values(f"steps[{s}].lr", tensor(step["lr"]), torch.tensor(lr, dtype=torch.float64), 0.0, LR_RTOL)
        total = torch.nn.utils.clip_grad_norm_([w, b], c["max_norm"])
        report.values(f"steps[{s}].total_norm", tensor(step["total_norm"]), total, 0.0, F32_RTOL)
        report.values(f"steps[{s}].clipped_w", tensor(step["clipped_w"]), w.grad, 0.0, F32_RTOL)
        report.values(f"steps[{s}].clipped_b", tensor(step["clipped_b"]), b.grad, 0.0, F32_RTOL)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        report.values(f"steps[{s}].w", tensor(step["w"]), w, F32_ATOL, F32_RTOL)
        report.values(f"steps[{s}].b", tensor(step["b"]), b, F32_ATOL, F32_RTOL)
    for name, param in (("w", w), ("b", b)):
        state = optimizer.state[param]
        # The moments are compared relative to their own scale: an element of m near 0 (a gradient
        # that changed sign) is the difference of two rounded terms.
        report.gradient(f"exp_avg_{name}", tensor(case[f"exp_avg_{name}"]), state["exp_avg"].flatten(), F32_RTOL)
        report.gradient(f"exp_avg_sq_{name}", tensor(case[f"exp_avg_sq_{name}"]), state["exp_avg_sq"].flatten(),
                        F32_RTOL)
        if int(state["step"]) != case["step_count"]:
            report.fail(f"step_count: moelab {case['step_count']}, torch {int(state['step'])}")


CHECKS = {"attention": check_attention, "block": check_block, "adamw": check_adamw}


def check_case(case):
    report = Report()
    try:
        CHECKS[case["component"]](case, report)
    except Exception as error:  # a malformed case, or a bug here: a failure, never a pass
        report.fail(f"the oracle could not check it: {error!r}")
    return report


# ---- driver ---------------------------------------------------------------------------------------

def run(files):
    passed = failed = 0
    for file in files:
        try:
            case = json.loads(pathlib.Path(file).read_text())
            report = check_case(case)
        except Exception as error:
            report = Report()
            report.fail(f"cannot read {file}: {error!r}")
        if report.failures:
            failed += 1
            print(f"FAIL {pathlib.Path(file).name}: " + "; ".join(report.failures[:5]))
        else:
            passed += 1
            fraction, message = report.worst
            print(f"PASS {pathlib.Path(file).name}: worst {fraction:.2g} of the tolerance ({message})")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or passed == 0 else 0


FORWARD_FIELDS = {"attention": ("y", "q", "k", "v", "probs"), "block": ("logits", "loss")}
GRADIENT_FIELDS = {
    "attention": ("dx", "d_q_proj", "d_k_proj", "d_v_proj", "d_o_proj"),
    "block": ("d_embed_tokens", "d_input_layernorm", "d_q_proj", "d_k_proj", "d_v_proj", "d_o_proj", "d_norm",
              "d_lm_head"),
}


def largest(values):
    """(path, value) of the largest |value| in nested lists; path is a list of indices."""
    if not isinstance(values, list):
        return [], number(values)
    best = None
    for i, v in enumerate(values):
        path, value = largest(v)
        if best is None or abs(value) > abs(best[1]):
            best = ([i] + path, value)
    return best


def mutate(case, key, relative, absolute=0.0):
    """A copy of case with the largest element of case[key...] moved by relative * |it| + absolute.
    key is a list of keys and indices into the case."""
    mutated = copy.deepcopy(case)
    container = mutated
    for k in key[:-1]:
        container = container[k]
    field = key[-1]
    if not isinstance(container[field], list):
        value = number(container[field])
        container[field] = value + relative * abs(value) + absolute
        return mutated
    path, value = largest(container[field])
    target = container[field]
    for i in path[:-1]:
        target = target[i]
    target[path[-1]] = value + relative * abs(value) + absolute
    return mutated


def mutations(case):
    """(description, field name the failure must mention, mutated case)."""
    component = case["component"]
    out = []
    if component in FORWARD_FIELDS:
        for field in FORWARD_FIELDS[component]:
            out.append((f"{field} off by 1e-8 relative", field, mutate(case, [field], 1e-8, 1e-11)))
        for field in GRADIENT_FIELDS[component]:
            # (+1e-30: a gradient that is exactly 0, as d_q_proj with one token, must stay exactly 0)
            out.append((f"{field} off by 1e-7 of its largest", field, mutate(case, [field], 1e-7, 1e-30)))
    if component == "attention" and case["config"]["seq_len"] > 1:
        # A probability above the diagonal: the mask must give exact zeros.
        mutated = copy.deepcopy(case)
        mutated["probs"][0][1] = 1e-9
        out.append(("probs[0][1] (masked) = 1e-9", "probs", mutated))
    if component == "adamw":
        for s in range(len(case["steps"])):
            for field, relative in (("lr", 1e-12), ("total_norm", 1e-5), ("clipped_w", 1e-5), ("clipped_b", 1e-5),
                                    ("w", 1e-5), ("b", 1e-5)):
                name = f"steps[{s}].{field}"
                out.append((f"{name} off by {relative:g} relative", name,
                            mutate(case, ["steps", s, field], relative)))
        for field in ("exp_avg_w", "exp_avg_sq_w", "exp_avg_b", "exp_avg_sq_b"):
            out.append((f"{field} off by 1e-5 relative", field, mutate(case, [field], 1e-5)))
    return out


def self_test(files):
    checked = missed = 0
    for file in files:
        case = json.loads(pathlib.Path(file).read_text())
        if check_case(case).failures:
            print(f"SKIP {pathlib.Path(file).name}: fails already, so its mutations prove nothing")
            continue
        for description, field, mutated in mutations(case):
            checked += 1
            failures = check_case(mutated).failures
            if not any(f.startswith(field) for f in failures):
                missed += 1
                print(f"MISSED {pathlib.Path(file).name}: {description} was not caught "
                      f"(failures: {failures[:3]})")
    print(f"self-test: {checked - missed} of {checked} mutations caught")
    return 1 if missed or checked == 0 else 0


def main(arguments):
    test = "--self-test" in arguments
    files = case_files([a for a in arguments if a != "--self-test"])
    if not files:
        print("transformer_oracle: no cases given")
        return 1
    return self_test(files) if test else run(files)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
