#!/usr/bin/python3
"""bench_torch_model.py — the tiny MoE language model of `moelab bench --model tiny_moe`, in PyTorch.

What it shows. How fast PyTorch on the CPU trains the same model as moelab's reference, written the
way a PyTorch user would (Hugging Face's Llama/Mixtral modules, eager mode), so that docs/perf.md can
put the two side by side. The model (moelab's tiny_moe, the numbers checked below: 887,360
parameters): byte embedding 256 x 64; 4 blocks of pre-RMSNorm causal attention (4 heads of 16, RoPE
theta 1e4, rotate_half) and a Mixtral MoE FFN (router 64 -> 8, softmax, top-2 of the logits, gates
= softmax of the two selected logits; SwiGLU experts 64 -> 128 -> 64, the Hugging Face per-expert
loop with index_add_; the Switch/Mixtral load-balancing loss, coefficient 0.02); final RMSNorm;
LM head 64 -> 256; cross-entropy. AdamW (lr 3e-3, betas 0.9/0.95, eps 1e-8, weight decay 0.1),
gradient clipping at 1.0. Batch 16 x 128 uniform random bytes, float32.

Measured as `moelab bench --model` measures: after --warmup untimed runs, the median of --repeats:
  train step         forward, backward, clipping, AdamW on the whole batch, --threads intra-op threads
                     (torch.set_num_threads; moelab splits the batch into 2 micro-batches on 2 threads);
  MoE layer          one MoE block's forward, and forward + backward, on 1024 tokens (one micro-batch)
                     with x ~ N(0, 1), on one thread, as each of moelab's threads runs it.
Run with Debian's python3 (python3-torch): /usr/bin/python3 tools/bench_torch_model.py [--threads 2]
[--repeats 10] [--warmup 2] [--json FILE]. Exit status 0 measured, 2 bad arguments.
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, LAYERS, HEADS, EXPERTS, TOP_K, EXPERT_HIDDEN = 256, 64, 4, 4, 8, 2, 128
BATCH, SEQ, MICRO_BATCHES = 16, 128, 2
ROPE_THETA, RMS_EPS, AUX_COEF, INIT_STD = 1e4, 1e-5, 0.02, 0.02
MOELAB_PARAMETERS = 887_360  # `moelab bench --model tiny_moe` prints it


class RMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4))
        d = HIDDEN // HEADS
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, d, 2).float() / d)
        angles = torch.outer(torch.arange(SEQ).float(), inv_freq)
        self.register_buffer("cos", torch.cat((angles, angles), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((angles, angles), -1).sin(), persistent=False)
        self.register_buffer("mask", torch.full((SEQ, SEQ), float("-inf")).triu(1), persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, HEADS, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = self.cos[:T], self.sin[:T]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + self.mask[:T, :T]
        y = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, HIDDEN))


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(HIDDEN, EXPERT_HIDDEN, bias=False)
        self.w3 = nn.Linear(HIDDEN, EXPERT_HIDDEN, bias=False)
        self.w2 = nn.Linear(EXPERT_HIDDEN, HIDDEN, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Mixtral's sparse MoE block as Hugging Face writes it: top-k of the logits, the per-expert loop."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, HIDDEN)
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1)
        top_logits, ids = torch.topk(logits, TOP_K, dim=-1)
        gates = torch.softmax(top_logits, dim=-1)
        y = torch.zeros_like(x)
        mask = F.one_hot(ids, EXPERTS).permute(2, 1, 0)  # (E, k, N)
        for e in range(EXPERTS):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            out = self.experts[e](x[token]) * gates[token, slot, None]
            y.index_add_(0, token, out)
        # Switch / Mixtral load balancing: E * sum_e (share of pairs to e) (mean router prob of e)
        share = F.one_hot(ids, EXPERTS).float().sum(1).mean(0) / TOP_K
        aux = EXPERTS * (share * probs.mean(0)).sum()
        return y.reshape(shape), aux


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(), RMSNorm()
        self.self_attn, self.moe = Attention(), MoE()

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        y, aux = self.moe(self.post_attention_layernorm(x))
        return x + y, aux


class TinyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=INIT_STD)

    def forward(self, ids, targets):
        x = self.embed_tokens(ids)
        aux_total = 0.0
        for block in self.layers:
            x, aux = block(x)
            aux_total = aux_total + aux
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)) + AUX_COEF * aux_total


def time_runs(warmup, repeats, f):
    for _ in range(warmup):
        f()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        seconds.append(time.perf_counter() - start)
    return seconds


def timing(seconds, tokens):
    t = statistics.median(seconds)
    return {"median_seconds": t, "min_seconds": min(seconds), "max_seconds": max(seconds),
            "repeats": len(seconds), "tokens": tokens, "tokens_per_second": tokens / t}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of the train step (default 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args()
    if not 1 <= args.threads <= 256 or not 0 <= args.warmup <= 1000 or not 1 <= args.repeats <= 10000:
        parser.error("--threads must be in [1, 256], --warmup in [0, 1000], --repeats in [1, 10000]")

    torch.manual_seed(args.seed)
    model = TinyMoE()
    parameters = sum(p.numel() for p in model.parameters())
    if parameters != MOELAB_PARAMETERS:
        sys.exit(f"bench_torch_model: the model has {parameters} parameters, moelab's tiny_moe {MOELAB_PARAMETERS}")
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    targets = torch.randint(0, VOCAB, (BATCH, SEQ))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    torch.set_num_threads(args.threads)
    train = time_runs(args.warmup, args.repeats, step)

    torch.set_num_threads(1)
    moe = MoE()
    for p in moe.parameters():
        nn.init.normal_(p, std=INIT_STD)
    tokens = BATCH * SEQ // MICRO_BATCHES
    x = torch.randn(tokens, HIDDEN, requires_grad=True)
    dy = torch.randn(tokens, HIDDEN)

    def forward():
        with torch.no_grad():
            moe(x)

    def forward_backward():
        y, aux = moe(x)
        torch.autograd.backward([y, aux], [dy, torch.tensor(1.0)])

    fwd = time_runs(args.warmup, args.repeats, forward)
    both = time_runs(args.warmup, args.repeats, forward_backward)

    doc = {"command": "bench_torch_model", "torch": torch.__version__, "parameters": parameters,
           "batch_size": BATCH, "seq_len": SEQ, "threads": args.threads,
           "train_step": timing(train, BATCH * SEQ),
           "moe_layer": {"tokens": tokens, "threads": 1, "forward": timing(fwd, tokens),
                         "forward_backward": timing(both, tokens)}}
    print(f"PyTorch {torch.__version__}: tiny_moe, {parameters} parameters; batch {BATCH} x {SEQ} bytes, "
          f"{args.threads} thread(s)")
    t = doc["train_step"]
    print(f"train step        {1e3 * t['median_seconds']:8.2f} ms  {t['tokens_per_second']:9.0f} tokens/s  "
          f"(median of {args.repeats}, min {1e3 * t['min_seconds']:.2f} ms, max {1e3 * t['max_seconds']:.2f} ms)")
    for name, key in (("MoE layer fwd    ", "forward"), ("MoE layer fwd+bwd", "forward_backward")):
        m = doc["moe_layer"][key]
        print(f"{name} {1e3 * m['median_seconds']:8.3f} ms  {m['tokens_per_second']:9.0f} tokens/s  ({tokens} tokens, one thread)")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench_torch_model.")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
