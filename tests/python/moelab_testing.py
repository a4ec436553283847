"""What the tests of the moelab module share: where things are, the CLI, finite differences.

ctest sets PYTHONPATH=<build>/python, MOELAB_SOURCE_DIR and MOELAB_CLI (tests/python/CMakeLists.txt).
"""
import json
import os
import subprocess
import tempfile

import numpy as np

import moelab

SOURCE_DIR = os.environ.get("MOELAB_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
GOLDEN_DIR = os.path.join(SOURCE_DIR, "golden")
CLI = os.environ.get("MOELAB_CLI", os.path.join(SOURCE_DIR, "build", "bin", "moelab"))


def cli_json(*args):
    """`moelab args --json`, which must succeed, parsed."""
    r = subprocess.run([CLI, *args, "--json"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise AssertionError(f"moelab {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return json.loads(r.stdout)


def cli_error(*args):
    """`moelab args`, which must fail with exit code 2: its message."""
    r = subprocess.run([CLI, *args], capture_output=True, text=True, check=False)
    if r.returncode != 2:
        raise AssertionError(f"moelab {' '.join(args)} exited {r.returncode}, not 2: {r.stdout}{r.stderr}")
    return r.stdout + r.stderr


_corpus = None


def small_corpus():
    """A small corpus of the generated domains only (an empty root), 8 KiB per domain, built once."""
    global _corpus
    if _corpus is None:
        out = tempfile.mkdtemp(prefix="moelab-corpus-")
        root = tempfile.mkdtemp(prefix="moelab-root-")
        moelab.build_corpus(out, root, max_domain_bytes=8192)
        _corpus = out
    return _corpus


def small_trainer(**overrides):
    """A tiny_moe trainer on the small corpus: 4 sequences of 32 bytes, one validation batch."""
    args = dict(steps=10, batch_size=4, seq_len=32, eval_batches=1, warmup_steps=2)
    args.update(overrides)
    return moelab.Trainer(corpus_dir=small_corpus(), threads=1, **args)


def central_difference(f, x, index, h):
    """(f(x + h e_i) - f(x - h e_i)) / 2h for the element `index` of array x (modified, then restored)."""
    old = x[index]
    x[index] = old + h
    up = f()
    x[index] = old - h
    down = f()
    x[index] = old
    return (up - down) / (2 * h)


def softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
