#!/usr/bin/env python3
"""bench_torch_moe.py — the MoE layers of `moelab bench --impl cuda`, in PyTorch, side by side.

What it shows. How fast PyTorch runs the same layers (the presets' published sizes, bf16 weights
and activations, fp32 router) the three ways a PyTorch user would write them:
  torch loop       Hugging Face's per-expert loop: for each expert that has tokens,
                   idx = where(ids == e), F.linear for gate/up, SwiGLU, F.linear for down,
                   index_add_ into y. It asks the host which experts have tokens, so it cannot be
                   captured in a CUDA graph: timed as eager launches between CUDA events.
  torch grouped    torch._grouped_mm (PyTorch 2.8+): the rows sorted by expert (argsort), one
                   grouped GEMM for gate/up and one for down (A (rows, K) bf16, B (E, K, N) bf16,
                   offs = int32 cumulative row ends), SwiGLU between, the rows put back in token
                   order and weighted. No host synchronisation: timed as CUDA-graph replays.
  ... experts      the experts alone, on a routing computed beforehand;
  ... layer        the whole layer: router (fp32 logits, the preset's scoring, top-k, gating) +
                   experts + shared experts + combine.
Every implementation is first checked against a float64 computation of the same layer (same
bf16-rounded weights and inputs, same routing) at T = 16: relative L2 error of y, ~1e-3 expected
(bf16 rounding of the intermediates and of y), 1e-2 allowed.

Measured as `moelab bench` measures (docs/perf.md, "Method"): the peaks first (a dense bf16 GEMM
8192^3 through torch.mm, a 2 GiB device-to-device copy, bytes read + written), then per shape and
T: median time, useful TFLOP/s (2 T k 3 C H: routed experts only; "(all)" adds the shared experts
and the router), effective GB/s (weights of the distinct experts touched + shared + router + x +
y), and the fraction of the roofline max(bytes / copy rate, flops / GEMM rate). Inputs are rotated
(several x buffers per graph) so that the work touches more than twice the L2 cache.

How to run (on a GPU machine, by hand; never in CI — the default python here has no torch):
  python3 tools/bench_torch_moe.py --shape mixtral,deepseek_v3,qwen3_30b_a3b,olmoe \\
      --tokens 1,16,128,4096,16384 [--routing uniform|skewed] [--replays 30] [--json torch.json]
  --device cpu checks the script itself on a machine without a GPU (eager, small T only).
Exit status: 0 measured, 1 a check failed or no CUDA device, 2 bad arguments.
"""

import argparse
import datetime
import json
import math
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    sys.exit("bench_torch_moe.py: error: needs PyTorch (import torch failed); run it on the GPU machine")

# The layers of `moelab bench` (reference/presets.cpp, full size): hidden C, experts E, top-k,
# expert width H, shared experts, and the routing convention.
SHAPES = {
    "mixtral": dict(preset="mixtral", C=4096, E=8, k=2, H=14336, shared=0,
                    routing="topk_logits_softmax"),           # softmax over the k selected logits
    "deepseek_v3": dict(preset="deepseek_v3", C=7168, E=256, k=8, H=2048, shared=2048,
                        routing="deepseek_v3"),                 # sigmoid, group-limited, renorm, x2.5
    "qwen3_30b_a3b": dict(preset="qwen3_moe", C=2048, E=128, k=8, H=768, shared=0,
                          routing="softmax_topk_renorm"),       # norm_topk_prob = true
    "olmoe": dict(preset="olmoe", C=2048, E=64, k=8, H=1024, shared=0,
                  routing="softmax_topk"),                      # no renormalisation
}
CHECK_TOKENS = 16
CHECK_TOLERANCE = 1e-2
CALIBRATION_TOKENS = 4096
ROW_BUDGET_S = 3.0  # replays are cut so that one measurement takes about this long


# ---- the layer -------------------------------------------------------------------------------------

class Layer:
    """Weights of one layer on the device: U(-a, a), a = sqrt(3 / fan_in), as MoeLayer::random."""

    def __init__(self, s, device, seed):
        g = torch.Generator(device=device).manual_seed(seed)
        C, E, H, S = s["C"], s["E"], s["H"], s["shared"]

        def uniform(shape, fan_in, dtype=torch.bfloat16):
            a = math.sqrt(3.0 / fan_in)
            return torch.empty(shape, dtype=torch.float32, device=device).uniform_(-a, a, generator=g).to(dtype)

        self.s = s
        self.router = uniform((E, C), C, torch.float32)            # (E, C) fp32
        self.selection_bias = torch.zeros(E, device=device)        # DeepSeek-V3's, zero at init
        self.gate_up = torch.empty((E, 2 * H, C), dtype=torch.bfloat16, device=device)
        for e in range(E):  # one expert at a time: no fp32 copy of all the weights
            self.gate_up[e] = uniform((2 * H, C), C)
        self.down = torch.empty((E, C, H), dtype=torch.bfloat16, device=device)
        for e in range(E):
            self.down[e] = uniform((C, H), H)
        self.shared_gate_up = uniform((2 * S, C), C) if S else None  # (2 S, C)
        self.shared_down = uniform((C, S), S) if S else None          # (C, S)

    def weight_bytes(self):
        t = [self.router, self.gate_up, self.down, self.shared_gate_up, self.shared_down]
        return sum(x.numel() * x.element_size() for x in t if x is not None)


def route(layer, x):
    """ids (T, k) int64, gates (T, k) fp32: the preset's convention on fp32 logits."""
    s = layer.s
    k, E = s["k"], s["E"]
    logits = x.float() @ layer.router.t()
    if s["routing"] == "topk_logits_softmax":
        top, ids = logits.topk(k, dim=-1)
        return ids, top.softmax(dim=-1)
    if s["routing"] == "deepseek_v3":
        n_group, topk_group = 8, 4
        scores = logits.sigmoid()
        biased = scores + layer.selection_bias
        T = x.shape[0]
        group_score = biased.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(dim=-1)
        keep = group_score.topk(topk_group, dim=-1).indices
        mask = torch.zeros(T, n_group, dtype=torch.bool, device=x.device).scatter_(1, keep, True)
        masked = biased.masked_fill(~mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
        ids = masked.topk(k, dim=-1).indices
        gates = scores.gather(1, ids)
        return ids, gates / (gates.sum(dim=-1, keepdim=True) + 1e-20) * 2.5
    gates, ids = logits.softmax(dim=-1).topk(k, dim=-1)
    if s["routing"] == "softmax_topk_renorm":
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return ids, gates


def shared_experts(layer, x):
    """The shared expert(s) as one SwiGLU MLP over all tokens, or None."""
    if layer.shared_gate_up is None:
        return None
    S = layer.s["shared"]
    gu = F.linear(x, layer.shared_gate_up)
    return F.linear(F.silu(gu[:, :S]) * gu[:, S:], layer.shared_down)


def experts_loop(layer, x, ids, gates):
    """Hugging Face's loop (Mixtral/OLMoE/Qwen3-MoE modelling code), fp32 accumulation of y."""
    H, E = layer.s["H"], layer.s["E"]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    expert_mask = F.one_hot(ids, num_classes=E).permute(2, 1, 0)  # (E, k, T)
    hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()  # host sync
    for e in hit:
        slot, token = torch.where(expert_mask[e])
        xe = x[token]
        gu = F.linear(xe, layer.gate_up[e])
        out = F.linear(F.silu(gu[:, :H]) * gu[:, H:], layer.down[e])
        y.index_add_(0, token, out.float() * gates[token, slot, None])
    return y


def permutation(ids, E):
    """Rows in expert order without the host: order (T k) of the (t, j) pairs, offs (E) int32 row ends."""
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts.cumsum(0).to(torch.int32)


def experts_grouped(layer, x, ids, gates, order, offs):
    """Two torch._grouped_mm calls with SwiGLU between; y in fp32."""
    H = layer.s["H"]
    T, k = ids.shape
    xs = x[order // k]                                                   # (T k, C) expert-major
    gu = torch._grouped_mm(xs, layer.gate_up.transpose(1, 2), offs=offs)  # (T k, 2H)
    out = torch._grouped_mm(F.silu(gu[:, :H]) * gu[:, H:], layer.down.transpose(1, 2), offs=offs)  # (T k, C)
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return (unsorted.view(T, k, -1).float() * gates.unsqueeze(-1)).sum(dim=1)


def layer_forward(layer, x, experts):
    """The whole layer: route, experts ('loop' or 'grouped'), shared experts, combine; y bf16."""
    ids, gates = route(layer, x)
    if experts == "loop":
        y = experts_loop(layer, x, ids, gates)
    else:
        order, offs = permutation(ids, layer.s["E"])
        y = experts_grouped(layer, x, ids, gates, order, offs)
    shared = shared_experts(layer, x)
    if shared is not None:
        y = y + shared.float()
    return y.to(torch.bfloat16)


def reference64(layer, x, ids, gates):
    """y in float64 from the same bf16 weights and inputs and the same routing."""
    H, S = layer.s["H"], layer.s["shared"]
    x64 = x.double()
    y = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in ids.unique().tolist():
        token, slot = torch.where(ids == e)
        w = layer.gate_up[e].double()
        h = F.silu(x64[token] @ w[:H].t()) * (x64[token] @ w[H:].t())
        y.index_add_(0, token, (h @ layer.down[e].double().t()) * gates[token, slot, None].double())
    if S:
        w = layer.shared_gate_up.double()
        h = F.silu(x64 @ w[:S].t()) * (x64 @ w[S:].t())
        y += h @ layer.shared_down.double().t()
    return y


def tokens(T, C, device, seed, skew=0.0, direction=None):
    """x = (z + skew u) / sqrt(1 + skew^2), z ~ U(-sqrt 3, sqrt 3) per element (variance 1), u the
    direction every token shares (skewed routing; as cuda/baselines.h fill_tokens)."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.empty((T, C), device=device).uniform_(-math.sqrt(3), math.sqrt(3), generator=g)
    if skew:
        z = (z + skew * direction) / math.sqrt(1 + skew * skew)
    return z.to(torch.bfloat16)


def calibrate_skew(layer, device, seed, direction):
    """The skew at which the busiest eighth of the experts get half of the pairs (as moelab bench)."""
    E, k = layer.s["E"], layer.s["k"]
    busiest = max(1, math.ceil(E / 8))
    target = min(0.5, 0.8 * busiest / k)

    def share(s):
        ids, _ = route(layer, tokens(CALIBRATION_TOKENS, layer.s["C"], device, seed, s, direction))
        counts = torch.bincount(ids.flatten(), minlength=E).sort(descending=True).values
        return (counts[:busiest].sum() / counts.sum()).item()

    lo, hi = 0.0, 1.0
    while share(hi) < target and hi < 64:
        lo, hi = hi, 2 * hi
    if share(hi) >= target:
        for _ in range(12):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if share(mid) < target else (lo, mid)
    return hi, share(hi), target


# ---- timing ----------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device):
    sync(device)
    start = time.perf_counter()
    fn(0)
    sync(device)
    return time.perf_counter() - start


def time_graph(fn, rotations, replays, warmup=3):
    """Median ms of one call: `rotations` calls captured in a CUDA graph, replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # once outside the graph: allocations, library set-up
        for r in range(rotations):
            fn(r)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(rotations):
            fn(r)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    ms = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b) / rotations)
    return ms


def time_eager(fn, rotations, replays, device):
    """Median ms of one call: `rotations` calls launched from the host between events."""
    for r in range(rotations):
        fn(r)
    sync(device)
    ms = []
    for _ in range(replays):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for r in range(rotations):
                fn(r)
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b) / rotations)
        else:
            start = time.perf_counter()
            for r in range(rotations):
                fn(r)
            ms.append((time.perf_counter() - start) * 1e3 / rotations)
    return ms


def measure(fn, rotations, replays, device, graph):
    """{'median_ms', 'min_ms', 'max_ms', 'replays', 'how'} or {'skipped': why}."""
    try:
        once = time_once(fn, device)
    except Exception as e:  # the work itself failed: say so in the row, go on
        return {"skipped": f"{type(e).__name__}: {e}".splitlines()[0]}
    n = max(min(3, replays), min(replays, int(ROW_BUDGET_S / max(once * rotations, 1e-6))))
    how = "graph" if graph and device.type == "cuda" else "eager"
    if how == "graph":
        try:
            ms = time_graph(fn, rotations, n)
        except Exception as e:  # not capturable after all: eager launches, said in the row
            how = f"eager (graph capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            torch.cuda.synchronize()
    if how != "graph":
        ms = time_eager(fn, rotations, n, device)
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "replays": n, "how": how}


def peak_gemm(device, replays):
    """Dense bf16 GEMM, torch.mm (n, n) x (n, n)^T: (median ms, n)."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.rand((n, n), device=device, dtype=torch.bfloat16)
    b = torch.rand((n, n), device=device, dtype=torch.bfloat16)
    c = torch.empty((n, n), device=device, dtype=torch.bfloat16)
    return measure(lambda r: torch.mm(a, b.t(), out=c), 1, replays, device, graph=True)["median_ms"], n


def peak_copy(device, replays):
    """Device-to-device copy of 2 GiB (64 MiB on cpu): (median ms, bytes copied)."""
    nbytes = 2 << 30 if device.type == "cuda" else 64 << 20
    src = torch.full((nbytes,), 0x3C, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return measure(lambda r: dst.copy_(src), 1, replays, device, graph=True)["median_ms"], nbytes


def peaks(device, replays):
    """The GEMM rate in flop/s and the copy rate in bytes/s (read + written)."""
    gemm_ms, n = peak_gemm(device, replays)
    copy_ms, nbytes = peak_copy(device, replays)
    return {"gemm": {"flops_per_s": 2 * n ** 3 / (gemm_ms * 1e-3), "median_ms": gemm_ms, "m_n_k": n},
            "copy": {"bytes_per_s": 2 * nbytes / (copy_ms * 1e-3), "median_ms": copy_ms, "bytes_copied": nbytes}}


# ---- one shape -------------------------------------------------------------------------------------

def work(s, T, distinct, scope):
    """flops and least bytes of one forward (as moelab bench counts them)."""
    C, E, k, H, S = s["C"], s["E"], s["k"], s["H"], s["shared"]
    w = {"routed_flops": 2.0 * T * k * 3 * C * H, "shared_flops": 0.0, "router_flops": 0.0}
    expert_bytes = 3.0 * C * H * 2
    if scope == "experts":
        w["bytes"] = distinct * expert_bytes + T * C * 2 + T * k * C * 2
    else:
        w["shared_flops"] = 2.0 * T * 3 * C * S
        w["router_flops"] = 2.0 * T * C * E
        w["bytes"] = distinct * expert_bytes + 3.0 * C * S * 2 + E * C * 4 + 2.0 * T * C * 2
    return w


def derive(row, pk):
    if "median_ms" not in row:
        return
    t = row["median_ms"] * 1e-3
    w = row["work"]
    flops = w["routed_flops"] + w["shared_flops"] + w["router_flops"]
    roofline = max(w["bytes"] / pk["copy"]["bytes_per_s"], flops / pk["gemm"]["flops_per_s"])
    row.update(median_us=t * 1e6, tflops_routed=w["routed_flops"] / t * 1e-12, tflops_all=flops / t * 1e-12,
               gbps=w["bytes"] / t * 1e-9, roofline_us=roofline * 1e6, efficiency=roofline / t)


def print_header():
    print(f"{'T':>6}  {'impl':<30} {'us':>10} {'TFLOP/s':>8} {'(all)':>8} {'GB/s':>8} {'roofline':>8} "
          f"{'experts':>8} {'max/mean':>8}")


def print_row(T, row):
    name = f"{row['impl']} {row['scope']}"
    if "median_us" not in row:
        print(f"{T:>6}  {name:<30} skipped: {row.get('skipped', '')}", flush=True)
        return
    print(f"{T:>6}  {name:<30} {row['median_us']:>10.1f} {row['tflops_routed']:>8.1f} {row['tflops_all']:>8.1f} "
          f"{row['gbps']:>8.0f} {100 * row['efficiency']:>7.1f}% {row['distinct_experts']:>8.1f} "
          f"{row['max_over_mean']:>8.2f}", flush=True)


def check(layer, device, seed):
    """Each implementation against float64 at T = CHECK_TOKENS; returns the check records."""
    s = layer.s
    x = tokens(CHECK_TOKENS, s["C"], device, seed)
    ids, gates = route(layer, x)
    ref = reference64(layer, x, ids, gates)
    shared = shared_experts(layer, x)
    shared = shared.float() if shared is not None else 0.0
    results = []
    impls = [("torch loop experts", lambda: (experts_loop(layer, x, ids, gates) + shared).to(torch.bfloat16)),
             ("torch loop layer", lambda: layer_forward(layer, x, "loop"))]
    if hasattr(torch, "_grouped_mm"):
        order, offs = permutation(ids, s["E"])
        impls += [("torch grouped experts",
                   lambda: (experts_grouped(layer, x, ids, gates, order, offs) + shared).to(torch.bfloat16)),
                  ("torch grouped layer", lambda: layer_forward(layer, x, "grouped"))]
    for name, fn in impls:
        try:
            y = fn().double()
            rel = ((y - ref).norm() / ref.norm()).item()
            ok = math.isfinite(rel) and rel <= CHECK_TOLERANCE
            results.append({"what": name, "rel_l2": rel, "passed": ok})
            print(f"{'':>6}  check {name} vs float64 at T = {CHECK_TOKENS}: rel. L2 {rel:.2e}: "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
        except Exception as e:
            results.append({"what": name, "error": str(e).splitlines()[0], "passed": None})
            print(f"{'':>6}  check {name}: not run: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
    return results


def run_shape(name, args, device, pk, l2_bytes):
    s = SHAPES[name]
    layer = Layer(s, device, args.seed)
    print(f"\n{name} = {s['preset']}: C {s['C']}, {s['E']} experts of H {s['H']}, top-{s['k']}"
          f"{', shared ' + str(s['shared']) if s['shared'] else ''}; routing {s['routing']}; "
          f"weights {layer.weight_bytes() / 1e9:.2f} GB", flush=True)
    doc = {"name": name, "preset": s["preset"], "config": s, "weight_bytes": layer.weight_bytes()}
    checks = check(layer, device, args.seed)
    doc["checks"] = checks
    g = torch.Generator(device=device).manual_seed(args.seed + 7)
    direction = torch.empty(s["C"], device=device).uniform_(-math.sqrt(3), math.sqrt(3), generator=g)
    skew = 0.0
    if args.routing == "skewed":
        skew, share, target = calibrate_skew(layer, device, args.seed + 11, direction)
        print(f"routing skewed: s = {skew:.3g}: the busiest eighth of the experts get {100 * share:.0f}% of the "
              f"pairs (target {100 * target:.0f}%)")
        doc["skew"] = {"s": skew, "busiest_share": share, "target_share": target}
    print_header()
    has_grouped = hasattr(torch, "_grouped_mm")
    results = []
    for T in args.tokens:
        x0 = tokens(T, s["C"], device, args.seed * 1000003 + T, skew, direction)
        ids0, _ = route(layer, x0)
        distinct0 = ids0.unique().numel()
        touched = work(s, T, distinct0, "layer")["bytes"]
        rotations = max(1, min(64, math.ceil(2 * l2_bytes / touched))) if device.type == "cuda" else 1
        xs = [x0] + [tokens(T, s["C"], device, args.seed * 1000003 + T + 7919 * r, skew, direction)
                     for r in range(1, rotations)]
        routing = [route(layer, x) for x in xs]
        perms = [permutation(ids, s["E"]) for ids, _ in routing]
        counts = [torch.bincount(ids.flatten(), minlength=s["E"]) for ids, _ in routing]
        distinct = statistics.mean(int((c > 0).sum()) for c in counts)
        max_over_mean = max((c.max() / c.float().mean()).item() for c in counts)

        def row(impl, scope, fn, graph, skipped=None):
            r = {"impl": impl, "scope": scope, "rotations": rotations, "work": work(s, T, distinct, scope),
                 "distinct_experts": distinct, "max_over_mean": max_over_mean}
            r.update({"skipped": skipped} if skipped else measure(fn, rotations, args.replays, device, graph))
            derive(r, pk)
            print_row(T, r)
            return r

        no_grouped = None if has_grouped else f"torch {torch.__version__} has no torch._grouped_mm"
        rows = [
            row("torch loop", "experts", lambda r: experts_loop(layer, xs[r], *routing[r]), graph=False),
            row("torch grouped", "experts",
                lambda r: experts_grouped(layer, xs[r], *routing[r], *perms[r]), graph=True, skipped=no_grouped),
            row("torch loop", "layer", lambda r: layer_forward(layer, xs[r], "loop"), graph=False),
            row("torch grouped", "layer", lambda r: layer_forward(layer, xs[r], "grouped"), graph=True,
                skipped=no_grouped),
        ]
        results.append({"tokens": T, "rotations": rotations, "rows": rows})
    doc["results"] = results
    return doc


def parse_list(text, kind):
    items = [t.strip() for t in text.split(",")]
    if any(not t for t in items):
        raise argparse.ArgumentTypeError(f"{text!r}: an item is empty")
    return [kind(t) for t in items]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="mixtral,deepseek_v3,qwen3_30b_a3b,olmoe",
                   type=lambda t: parse_list(t, str), help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--tokens", default="1,16,128,4096,16384", type=lambda t: parse_list(t, int),
                   help="comma-separated token counts T")
    p.add_argument("--routing", default="uniform", choices=["uniform", "skewed"])
    p.add_argument("--replays", default=30, type=int, help="replays per measurement, the median is reported")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--json", help="also write everything measured to this file")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: only to check this script without a GPU (eager, slow: use small --tokens)")
    args = p.parse_args()
    for name in args.shape:
        if name not in SHAPES:
            p.error(f"--shape {name}: must be one of {', '.join(SHAPES)}")
    if any(t < 1 for t in args.tokens):
        p.error("--tokens: each T must be at least 1")
    if args.replays < 1:
        p.error("--replays: must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_torch_moe.py: error: no CUDA device (torch.cuda.is_available() is False); "
                 "--device cpu checks the script only")
    device = torch.device(args.device)

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
        device_doc = {"name": props.name, "sm": props.major * 10 + props.minor,
                      "multiprocessors": props.multi_processor_count, "l2_bytes": l2_bytes}
    else:
        l2_bytes, device_doc = 0, {"name": "cpu"}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{device_doc['name']}; torch {torch.__version__}; _grouped_mm {hasattr(torch, '_grouped_mm')}; {date}")
    pk = peaks(device, args.replays)
    n, nbytes = pk["gemm"]["m_n_k"], pk["copy"]["bytes_copied"]
    print(f"peak dense bf16 GEMM (torch.mm {n}^3): {pk['gemm']['flops_per_s'] * 1e-12:.1f} TFLOP/s "
          f"({pk['gemm']['median_ms']:.3f} ms)")
    print(f"peak copy ({nbytes / 2**30:g} GiB, read + written): {pk['copy']['bytes_per_s'] * 1e-9:.0f} GB/s "
          f"({pk['copy']['median_ms']:.3f} ms)", flush=True)
    doc = {"command": "bench_torch_moe", "torch": torch.__version__, "date": date, "device": device_doc,
           "options": {"shapes": args.shape, "tokens": args.tokens, "routing": args.routing,
                       "replays": args.replays, "seed": args.seed},
           "peaks": pk, "shapes": []}
    for name in args.shape:
        doc["shapes"].append(run_shape(name, args, device, pk, l2_bytes))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the shape's weights, before the next shape's
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"\nwrote {args.json}")
    failed = [c["what"] for sh in doc["shapes"] for c in sh["checks"] if c["passed"] is False]
    if failed:
        print(f"checks FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
