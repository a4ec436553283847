"""moelab_golden: check your MoE kernel against moelab's golden values.

One file, Python 3.9+ and numpy only: copy it into your project. It reads the golden set that
`moelab golden` writes (manifest.json + one safetensors file per case, format: docs/golden.md)
and compares what your kernel produced with the expected values, check by check, exactly as
`moelab check` does.

Testing a kernel:

    import moelab_golden as mg

    for entry in mg.cases("golden", "*.routing.bf16"):            # a shell glob over case names
        case = mg.load_case("golden", entry["name"])
        x = case.inputs["input.x"]                             # float32, exactly the case's bf16 values
        w = case.inputs["param.router.weight"]
        logits, ids = my_router(x, w, case.config)             # your kernel; hand back numpy arrays
        report = mg.compare(case, {"output.logits": logits, "output.topk_ids": ids})
        print(report)                                          # one line per check
        assert report.ok, report.verdict                       # pass, or ambiguous (a near-tie)

From PyTorch: `torch.from_numpy(x).to(torch.bfloat16).cuda()` on the way in (exact: the values
are bf16 values), `y.float().cpu().numpy()` on the way out. Tensors you do not produce are "not
supported", never failures. Verdicts: pass; fail; ambiguous (your top-k differs from the
reference's only at a near-tie, so rounding decided it: not an error, and the tokens involved are
left out of the other checks); not supported (nothing you produced is checked). `report.ok` is
True for pass and ambiguous.

Command line: `python3 moelab_golden.py GOLDEN_DIR [--filter GLOB] --list`, or `--show NAME`.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import struct
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

FORMAT_VERSION = 1
MAX_HEADER = 100_000_000  # bytes, as the Rust reader: a longer "header" is a corrupt length field


class GoldenError(ValueError):
    """Bad input: a malformed file, a manifest this module does not read, an unknown case."""


# ---- dtypes ------------------------------------------------------------------------------------
# How each safetensors dtype is stored (little-endian). numpy has no bf16/fp8: they are read as
# bits and decoded to float32, which holds every one of their values exactly.
_STORAGE = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "F8_E4M3": "u1",
            "F8_E5M2": "u1", "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "u1"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_BITS_ONLY = ("BF16", "F8_E4M3", "F8_E5M2")


def _fp8_table(exp_bits: int, man_bits: int, bias: int, ieee: bool) -> np.ndarray:
    """The value of each of the 256 codes S.E.M, from the definition of the format."""
    table = np.empty(256, np.float32)
    top, man_max = (1 << exp_bits) - 1, (1 << man_bits) - 1
    for code in range(256):
        sign = -1.0 if code >> 7 else 1.0  # applied by copysign, so that NaNs keep it too
        e, m = (code >> man_bits) & top, code & man_max
        if e == top and ieee:              # E5M2 is IEEE-like: all-ones exponent = inf or NaN
            value = math.inf if m == 0 else math.nan
        elif e == top and m == man_max:    # E4M3FN has no inf: only S.1111.111 is NaN
            value = math.nan
        elif e == 0:                       # subnormal: no implicit 1, exponent 1 - bias
            value = m / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            value = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        table[code] = math.copysign(value, sign)
    return table


_E4M3 = _fp8_table(4, 3, bias=7, ieee=False)   # OCP E4M3FN: max 448, min subnormal 2^-9
_E5M2 = _fp8_table(5, 2, bias=15, ieee=True)   # OCP E5M2: max 57344, min subnormal 2^-16


def decode(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of `dtype` as numpy values: BF16/F8 bits -> float32 (exact), BOOL -> bool."""
    if dtype == "BF16":                      # bf16 is the top half of a float32
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E4M3":
        return _E4M3[bits]
    if dtype == "F8_E5M2":
        return _E5M2[bits]
    if dtype == "BOOL":
        return bits.astype(bool)
    return bits.astype(np.dtype(_STORAGE[dtype]).newbyteorder("="))


# ---- safetensors -------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)   # JSON true is not a size


def _unique_keys(pairs):
    counts = Counter(k for k, _ in pairs)
    dup = [k for k, n in counts.items() if n > 1]
    if dup:
        raise ValueError(f"duplicate key {dup[0]!r}")
    return dict(pairs)


def _entry(what: str, entry) -> Tuple[str, List[int], int, int]:
    if not isinstance(entry, dict):
        raise GoldenError(f"{what}: entry is not a JSON object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise GoldenError(f"{what}: entry lacks '{key}'")
    extra = sorted(set(entry) - {"dtype", "shape", "data_offsets"})
    if extra:
        raise GoldenError(f"{what}: entry has unknown field(s) {extra}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _STORAGE:
        raise GoldenError(f"{what}: unknown dtype {dtype!r} (known: {', '.join(_STORAGE)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise GoldenError(f"{what}: shape = {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise GoldenError(f"{what}: data_offsets = {offsets!r} is not two integers 0 <= begin <= end")
    return dtype, shape, offsets[0], offsets[1]


def _parse(path) -> Tuple[Dict[str, np.ndarray], Dict[str, str], Dict[str, str]]:
    """(tensors as stored bits/values, dtype of each, metadata); never trusts a byte of the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise GoldenError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) < 8:
        raise GoldenError(f"{path}: {len(data)} bytes, fewer than the 8 of the header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER:
        raise GoldenError(f"{path}: header length {n} is above 100 MB")
    if n > len(data) - 8:
        raise GoldenError(f"{path}: header length {n} runs past the end of the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise GoldenError(f"{path}: header is not UTF-8") from None
    except ValueError as e:
        raise GoldenError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise GoldenError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise GoldenError(f"{path}: __metadata__ is not an object of strings")
    buffer = data[8 + n:]
    tensors, dtypes, spans = {}, {}, []
    for name, entry in header.items():
        what = f"{path}: tensor '{name}'"
        dtype, shape, begin, end = _entry(what, entry)
        storage = np.dtype(_STORAGE[dtype])
        need = storage.itemsize * math.prod(shape)
        if end > len(buffer):
            raise GoldenError(f"{what}: data_offsets = [{begin}, {end}] run past the data buffer "
                              f"({len(buffer)} bytes)")
        if end - begin != need:
            raise GoldenError(f"{what}: data_offsets = [{begin}, {end}]: {end - begin} bytes, but "
                              f"dtype {dtype} and shape {shape} need {need}")
        bits = np.frombuffer(buffer[begin:end], storage).reshape(shape)
        if dtype == "BOOL" and np.any(bits > 1):
            raise GoldenError(f"{what}: a BOOL byte is not 0 or 1")
        tensors[name] = bits.astype(storage.newbyteorder("="))   # native order, own memory
        dtypes[name] = dtype
        spans.append((begin, end, name))
    # The tensors must tile the buffer exactly: no overlap (two tensors sharing bytes), no hole.
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise GoldenError(f"{path}: tensor '{name}' overlaps tensor '{previous}' "
                              f"(data_offsets [{begin}, {end}], previous ends at {position})")
        if begin > position:
            raise GoldenError(f"{path}: tensor '{name}': bytes [{position}, {begin}) before it "
                              f"belong to no tensor (holes are not allowed)")
        position, previous = end, name
    if position != len(buffer):
        raise GoldenError(f"{path}: bytes [{position}, {len(buffer)}) of the data buffer belong to "
                          f"no tensor (holes are not allowed)")
    return tensors, dtypes, metadata


def read_safetensors(path, raw: bool = False) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(tensors, metadata). BF16 and F8 come as exact float32, or with raw=True as their bits
    (uint16 / uint8); F16 as float16, BOOL as bool, integers as themselves."""
    bits, dtypes, metadata = _parse(path)
    return {name: a if raw and dtypes[name] in _BITS_ONLY else decode(a, dtypes[name])
            for name, a in bits.items()}, metadata


# ---- manifest and cases ------------------------------------------------------------------------
def load_manifest(golden_dir) -> dict:
    path = os.path.join(golden_dir, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except OSError as e:
        raise GoldenError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise GoldenError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise GoldenError(f"{path}: not a JSON object")
    version = manifest.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise GoldenError(f"{path}: format_version {version!r} is not supported; this "
                          f"moelab_golden.py reads format_version {FORMAT_VERSION}")
    entries = manifest.get("cases")
    if not isinstance(entries, list) or not all(isinstance(c, dict) for c in entries):
        raise GoldenError(f"{path}: 'cases' is not a list of objects")
    for i, c in enumerate(entries):
        name, file = c.get("name"), c.get("file")
        if not isinstance(name, str) or not isinstance(file, str) or os.path.basename(file) != file:
            raise GoldenError(f"{path}: case {i} needs a 'name' and a 'file' inside the folder")
    return manifest


def cases(golden_dir, pattern: str = "*") -> List[dict]:
    """The manifest entries whose name matches a shell glob ("mixtral.*", "*.bf16")."""
    return [c for c in load_manifest(golden_dir)["cases"] if fnmatch.fnmatchcase(c["name"], pattern)]


@dataclass
class Case:
    entry: dict                      # the manifest entry
    inputs: Dict[str, np.ndarray]    # input.* and param.*: float32 (F64 stays float64), integers
    expected: Dict[str, np.ndarray]  # output.* and grad.*: F64 as float64, BF16/F16/F8 as float32
    raw: Dict[str, np.ndarray]       # every tensor as stored (BF16/F8 as bits)
    dtypes: Dict[str, str]           # every tensor's safetensors dtype

    name = property(lambda self: self.entry["name"])
    config = property(lambda self: self.entry.get("config", {}))
    dtype = property(lambda self: self.entry.get("dtype"))
    checks = property(lambda self: self.entry.get("checks", []))


def _values(bits: np.ndarray, dtype: str) -> np.ndarray:
    values = decode(bits, dtype)
    return values.astype(np.float32) if dtype in FLOAT_DTYPES and dtype != "F64" else values


def load_case(golden_dir, name: str) -> Case:
    found = [c for c in load_manifest(golden_dir)["cases"] if c["name"] == name]
    if not found:
        raise GoldenError(f"{golden_dir}: no case named {name!r} in manifest.json")
    entry = found[0]
    path = os.path.join(golden_dir, entry["file"])
    tensors, checks = entry.get("tensors"), entry.get("checks")
    if (not isinstance(tensors, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                                 for t in tensors) or not isinstance(checks, list)):
        raise GoldenError(f"case {name}: 'tensors' must be a list of named objects, 'checks' a list")
    bits, dtypes, _ = _parse(path)
    listed = {t["name"]: t for t in tensors}
    for t in sorted(set(listed) ^ set(bits), key=str):
        where = "the file" if t in listed else "the manifest"
        raise GoldenError(f"{path}: tensor '{t}' is missing from {where}")
    inputs, expected = {}, {}
    for t, a in bits.items():
        if listed[t].get("dtype") != dtypes[t] or listed[t].get("shape") != list(a.shape):
            raise GoldenError(f"{path}: tensor '{t}' is {dtypes[t]} {list(a.shape)}, but the "
                              f"manifest says {listed[t].get('dtype')} {listed[t].get('shape')}")
        prefix = t.split(".", 1)[0]
        if prefix not in ("input", "param", "output", "grad"):
            raise GoldenError(f"{path}: tensor '{t}' has none of the prefixes input/param/output/grad")
        (inputs if prefix in ("input", "param") else expected)[t] = _values(a, dtypes[t])
    case = Case(entry, inputs, expected, bits, dtypes)
    for i, check in enumerate(case.checks):
        _validate(case, i, check)
    return case


_KINDS = {"allclose": ("atol", "rtol", "nmse"), "exact": (), "bitwise": (),
          "topk_set": ("ranking", "atol", "rtol"), "permutation": ("offsets",)}


def _validate(case: Case, i: int, check) -> None:
    """A check this module cannot run is a bad golden set, reported at load time."""
    tensor = check.get("tensor") if isinstance(check, dict) else None

    def bad(rule):
        raise GoldenError(f"case {case.name}: check {i} ({tensor}): {rule}")
    if not isinstance(tensor, str) or tensor not in case.expected:
        bad("'tensor' must name an output.* or grad.* tensor of the case")
    kind = check.get("compare")
    if not isinstance(kind, str) or kind not in _KINDS:
        bad(f"unknown compare {kind!r} (known: {', '.join(_KINDS)})")
    for key in _KINDS[kind]:
        if key not in check:
            bad(f"'{kind}' needs '{key}'")
        number = check[key]
        is_number = isinstance(number, (int, float)) and not isinstance(number, bool)
        if key in ("atol", "rtol", "nmse") and not (is_number and math.isfinite(number) and number >= 0):
            bad(f"{key} = {number!r} is not a finite number >= 0")
    if not isinstance(check.get("transposed", False), bool):
        bad("transposed must be true or false")
    rows = check.get("rows", "all")
    if rows not in ("token", "permuted", "all"):
        bad(f"rows = {rows!r} is not token, permuted or all")
    needed = [check[k] for k in ("align", "slot", "offsets") if k in check]
    if rows == "permuted":
        by_slot = "output.row_slot" in case.expected
        needed += ["output.row_token", "output.row_slot" if by_slot else "output.offsets"]
    for t in needed:
        if not isinstance(t, str) or t not in case.expected:
            bad(f"needs the reference tensor {t!r}, which the case lacks")
    shape = case.expected[tensor].shape
    if rows != "all" and len(shape) == 0:
        bad(f"rows = {rows!r} on a scalar")
    if "align" in check and (rows == "permuted" or len(shape) != 2
                             or case.expected[check["align"]].shape != shape):
        bad(f"align: '{check['align']}' must have the (T, k) shape of the tensor, {list(shape)}")
    if kind == "topk_set" and (not isinstance(check["ranking"], str)
                               or check["ranking"] not in {**case.expected, **case.inputs}):
        bad(f"ranking tensor '{check['ranking']}' is not in the case")


# ---- comparison --------------------------------------------------------------------------------
PASS, FAIL, AMBIGUOUS, NOT_SUPPORTED = "pass", "fail", "ambiguous", "not supported"


@dataclass
class CheckResult:
    tensor: str
    compare: str
    verdict: str                   # pass, fail, ambiguous, not supported
    worst: Optional[float] = None  # allclose: max |out - ref| / (atol + rtol |ref|); 1 = at tolerance
    nmse: Optional[float] = None
    tolerance: str = ""
    message: str = ""
    left_out: int = 0              # reference rows of ambiguous tokens not compared


class Report:
    def __init__(self, case: str, checks: List[CheckResult], ambiguous_tokens, unchecked):
        self.case, self.checks = case, checks
        self.ambiguous_tokens = sorted(ambiguous_tokens)  # tokens whose selection was a near-tie
        self.unchecked = sorted(unchecked)                # produced names no check uses

    @property
    def verdict(self) -> str:      # docs/golden.md, "Verdicts"
        seen = [c.verdict for c in self.checks]
        if FAIL in seen:
            return FAIL
        if AMBIGUOUS in seen or any(c.left_out for c in self.checks):
            return AMBIGUOUS
        return PASS if PASS in seen else NOT_SUPPORTED

    @property
    def ok(self) -> bool:
        """pass or ambiguous: a near-tie decided by rounding is not a failure."""
        return self.verdict in (PASS, AMBIGUOUS)

    @property
    def worst(self) -> Optional[float]:
        errors = [c.worst for c in self.checks if c.worst is not None]
        return max(errors) if errors else None

    def __str__(self) -> str:
        worst = "" if self.worst is None else f" (worst error {self.worst:.3g} of the tolerance)"
        lines = [f"case {self.case}: {self.verdict.upper()}{worst}"]
        rows = [("tensor", "compare", "verdict", "worst", "nmse", "tolerance", "message")]
        for c in self.checks:
            rows.append((c.tensor, c.compare, c.verdict, _num(c.worst), _num(c.nmse), c.tolerance, c.message))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines += ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(6)) + "  " + r[6] for r in rows]
        if self.ambiguous_tokens:
            lines.append(f"  ambiguous tokens (near-ties, left out): {self.ambiguous_tokens}")
        if self.unchecked:
            lines.append(f"  produced but not checked: {', '.join(self.unchecked)}")
        return "\n".join(line.rstrip() for line in lines)

    def print(self) -> None:
        print(self)


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"


class _Fail(Exception):
    """The check fails, with this message."""


class _Ambiguous(Exception):
    """The check cannot be judged because of an ambiguous token."""


def _as_array(name: str, value) -> np.ndarray:
    try:
        a = np.asarray(value)
    except Exception as e:  # e.g. a torch bf16 tensor, which numpy cannot hold
        raise GoldenError(f"produced '{name}': not convertible to numpy ({e}); "
                          f"pass .float().cpu().numpy()") from None
    if a.dtype.kind not in "biuf":
        raise GoldenError(f"produced '{name}': not a numeric array (dtype {a.dtype})")
    return a


def _ids(name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iub" or (a.dtype.kind == "f" and np.all(np.isfinite(a) & (a == np.round(a)))):
        return a.astype(np.int64)
    raise _Fail(f"{name} must hold integer ids")


def _shape(a) -> str:
    return str(list(np.shape(a)))


def compare(case: Case, produced: Dict[str, object]) -> Report:
    """Runs every check of the case on the tensors you produced (name -> array-like)."""
    out = {name: _as_array(name, v) for name, v in produced.items()}
    results: List[Optional[CheckResult]] = [None] * len(case.checks)
    # Selections first: their near-ties decide which tokens the other checks leave out.
    differing, ambiguous = {}, set()
    for i, check in enumerate(case.checks):
        if check["compare"] == "topk_set" and check["tensor"] in out:
            try:
                differing[i] = _topk_rows(case, check, out[check["tensor"]])
            except _Fail as e:
                results[i] = CheckResult(check["tensor"], "topk_set", FAIL, tolerance=_tol(check),
                                         message=str(e))
                continue
            ambiguous.update(t for row in differing[i] if row[2] for t in row[1])
    for i, rows in differing.items():
        results[i] = _topk_result(case.checks[i], rows, ambiguous)
    for i, check in enumerate(case.checks):
        if results[i] is None:
            results[i] = _run(case, check, out, ambiguous)
    used = {c[k] for c in case.checks for k in ("tensor", "slot", "offsets", "align") if k in c}
    if any(c.get("rows") == "permuted" for c in case.checks):
        used |= {"output.row_token", "output.row_slot", "output.offsets"}
    return Report(case.name, results, ambiguous, set(out) - used)


def _tol(check) -> str:
    kind = check["compare"]
    if kind == "allclose":
        return f"atol {check['atol']:.3g} rtol {check['rtol']:.3g} nmse {check['nmse']:.3g}"
    if kind == "topk_set":
        return f"tie atol {check['atol']:.3g} rtol {check['rtol']:.3g}"
    return kind


def _run(case: Case, check, out, ambiguous) -> CheckResult:
    name, kind = check["tensor"], check["compare"]
    result = CheckResult(name, kind, NOT_SUPPORTED, tolerance=_tol(check), message="not produced")
    if name not in out:
        return result
    try:
        if kind == "permutation":
            ok, message, left = _permutation(case, check, out, ambiguous)
            worst = nmse = None
            compared = True
        else:
            got = _bits_as_values(out[name], case.dtypes[name]) if kind == "bitwise" else out[name]
            ref, got, labels, left = _select(case, check, case.expected[name], got, out, ambiguous)
            ok, message, worst, nmse = _COMPARE[kind](check, ref, got, labels)
            compared = ref.size > 0
    except _Fail as e:
        result.verdict, result.message = FAIL, str(e)
        return result
    except _Ambiguous as e:
        result.verdict, result.message = AMBIGUOUS, str(e)
        return result
    result.verdict = PASS if ok else FAIL
    result.message, result.worst, result.nmse, result.left_out = message, worst, nmse, left
    if ok and left:
        result.message = f"left out {left} rows of ambiguous tokens" + (f"; {message}" if message else "")
        if not compared:
            result.verdict = AMBIGUOUS   # every row was left out: nothing was judged
    return result


def _select(case, check, ref, got, out, ambiguous):
    """The rows to compare, per the check's "rows" and "align": (ref, got, row labels, left out)."""
    rows = check.get("rows", "all")
    if rows == "permuted":
        return _match_permuted(case, ref, got, out, ambiguous)
    if got.shape != ref.shape:
        raise _Fail(f"shape {_shape(got)}, expected {_shape(ref)}")
    labels, left = None, 0
    if rows == "all" and ambiguous:
        raise _Ambiguous(f"depends on every token, and tokens {sorted(ambiguous)} are ambiguous")
    if rows == "token":
        labels = np.array([t for t in range(ref.shape[0]) if t not in ambiguous], np.int64)
        ref, got, left = ref[labels], got[labels], ref.shape[0] - len(labels)
    if "align" in check:
        ref = _align(case, check, ref, out, labels)
    return ref, got, labels, left


def _align(case, check, ref, out, labels):
    """Reorders each token's k reference entries to the implementation's order of expert ids."""
    ids_ref = case.expected[check["align"]].astype(np.int64)
    ids_out = _ids(check["align"], out.get(check["align"], ids_ref))
    if ids_out.shape != ids_ref.shape:
        raise _Fail(f"align: {check['align']} has shape {_shape(ids_out)}, expected {_shape(ids_ref)}")
    aligned = np.empty_like(ref)
    for i in range(ref.shape[0]):
        t = i if labels is None else labels[i]
        for j, e in enumerate(ids_out[t]):
            match = np.flatnonzero(ids_ref[t] == e)
            if len(match) == 0:
                raise _Fail(f"align: token {t} has expert {e}, which the reference did not choose")
            aligned[i, j] = ref[i, match[0]]
    return aligned


def _pairs(case, tensors, tokens_name, slots_name, offsets_name):
    """(token, slot, expert) of each permuted row that `tensors` (the implementation's outputs or
    case.expected) describe; slot is None without slots, expert None without offsets. A kernel may
    order a token's k experts differently (by id, say), so that its slot j names another expert
    than the reference's slot j: its slots are renumbered to the reference's order."""
    tokens = _ids(tokens_name, tensors[tokens_name]).ravel()
    slots = experts = [None] * len(tokens)
    if slots_name in tensors:
        found = _ids(slots_name, tensors[slots_name]).ravel()
        if len(found) != len(tokens):
            raise _Fail(f"{slots_name} has {len(found)} rows, {tokens_name} {len(tokens)}")
        mine = tensors is not case.expected
        if mine and "output.topk_ids" in case.expected and "output.topk_ids" in tensors:
            found = _renumber(case, tensors, tokens, found)
        slots = found.tolist()
    if offsets_name:
        ref_offsets = case.expected[offsets_name].astype(np.int64).ravel()
        offsets = _ids(offsets_name, tensors.get(offsets_name, ref_offsets)).ravel()
        if (offsets.shape != ref_offsets.shape or offsets[0] != 0 or np.any(np.diff(offsets) < 0)
                or offsets[-1] != len(tokens)):
            raise _Fail(f"{offsets_name} {offsets.tolist()} do not split {len(tokens)} rows into "
                        f"{len(ref_offsets) - 1} expert blocks")
        experts = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)).tolist()
    return list(zip(tokens.tolist(), slots, experts))


def _renumber(case, out, tokens, slots):
    ids_ref = case.expected["output.topk_ids"].astype(np.int64)
    ids_out = _ids("output.topk_ids", out["output.topk_ids"])
    if ids_out.shape != ids_ref.shape:
        return slots   # the topk_set check reports the shape; keep the implementation's slots
    renumbered = slots.copy()
    for r, (t, s) in enumerate(zip(tokens, slots)):
        if not (0 <= t < ids_ref.shape[0] and 0 <= s < ids_ref.shape[1]):
            raise _Fail(f"row {r}: (token {t}, slot {s}) is out of range")
        match = np.flatnonzero(ids_ref[t] == ids_out[t, s])
        renumbered[r] = match[0] if len(match) else -1 - s   # an expert the reference did not choose
    return renumbered


def _match_permuted(case, ref, got, out, ambiguous):
    """Matches implementation rows to reference rows by their pair: (token, slot) where the case
    stores output.row_slot, else (token, expert) with the expert from output.offsets' blocks."""
    by_slot = "output.row_slot" in case.expected
    names = ("output.row_token",) + (("output.row_slot", None) if by_slot else (None, "output.offsets"))
    source = out if all(n in out for n in names[:2] if n) else case.expected   # else: the reference's order
    key = (lambda p: (p[0], "slot", p[1])) if by_slot else (lambda p: (p[0], "expert", p[2]))
    pairs = [key(p) for p in _pairs(case, source, *names)]
    ref_pairs = [key(p) for p in _pairs(case, case.expected, *names)]
    if got.shape[1:] != ref.shape[1:] or got.shape[0] != len(pairs):
        raise _Fail(f"shape {_shape(got)}, expected {[len(pairs)] + list(ref.shape[1:])}")
    where = {p: r for r, p in enumerate(ref_pairs)}
    mine, theirs = [], {}             # implementation row -> reference row, in the kernel's order
    for r, p in enumerate(pairs):
        if p[0] in ambiguous:
            continue
        if p not in where or p in theirs:
            raise _Fail(f"row {r}: (token {p[0]}, {p[1]} {p[2]}) is "
                        f"{'repeated' if p in theirs else 'not a pair of the reference'}")
        mine.append(r)
        theirs[p] = where[p]
    missing = [p for p in ref_pairs if p[0] not in ambiguous and p not in theirs]
    if missing:
        t, what, which = missing[0]
        raise _Fail(f"{len(missing)} reference rows missing, e.g. (token {t}, {what} {which})")
    left = sum(1 for p in ref_pairs if p[0] in ambiguous)
    return ref[list(theirs.values())], got[mine], np.array(mine, np.int64), left


def _index(labels, flat: int, shape) -> tuple:
    index = tuple(int(i) for i in np.unravel_index(flat, shape))
    return index if labels is None else (int(labels[index[0]]),) + index[1:]


def _allclose(check, ref, got, labels):
    atol, rtol, limit = float(check["atol"]), float(check["rtol"]), float(check["nmse"])
    r, o = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    with np.errstate(all="ignore"):
        err, bound = np.abs(o - r), atol + rtol * np.abs(r)
        bad = ~(err <= bound) | ~np.isfinite(o)          # NaN compares false: it fails
        ratio = np.divide(err, bound, out=np.where(err == 0, 0.0, np.inf), where=bound > 0)
        ratio[bad & np.isnan(ratio)] = np.inf            # NaN out, or inf - inf
        ratio[bad & (ratio <= 1)] = np.nextafter(1.0, 2.0)  # beyond by less than the quotient rounds
        sum_ref = float(np.sum(r * r))
        nmse = float(np.sum((o - r) ** 2)) / sum_ref if sum_ref > 0 else float(np.sum(o * o))
    worst = float(ratio.max()) if ratio.size else 0.0
    if bad.any():
        k = int(np.argmax(ratio))
        return False, (f"{int(bad.sum())} of {r.size} beyond atol + rtol|ref|, worst at "
                       f"{_index(labels, k, ref.shape)}: {o[k]:.9g} vs {r[k]:.9g}"), worst, nmse
    if not nmse <= limit:
        return False, f"NMSE {nmse:.3g} above {limit:.3g}", worst, nmse
    return True, "", worst, nmse


def _mismatch(equal, ref, got, labels, what):
    if equal.all():
        return True, "", None, None
    k = int(np.argmin(equal.ravel()))
    return False, (f"{int((~equal).sum())} of {equal.size} elements {what}, first at "
                   f"{_index(labels, k, ref.shape)}: {got.ravel()[k]} vs {ref.ravel()[k]}"), None, None


def _exact(check, ref, got, labels):
    return _mismatch(np.asarray(got == ref), ref, got, labels, "differ")


def _bits_as_values(got, dtype):
    """Raw bits of the checked dtype (uint16 for BF16, ...) are decoded; values pass through."""
    size = np.dtype(_STORAGE[dtype]).itemsize
    if dtype in FLOAT_DTYPES and got.dtype.kind in "iu" and got.dtype.itemsize == size:
        bits = np.ascontiguousarray(got).view(f"u{size}")
        return decode(bits, dtype) if dtype in _BITS_ONLY else bits.view(f"f{size}")
    return got


def _bitwise(check, ref, got, labels):
    if ref.dtype.kind != "f":
        return _mismatch(np.asarray(got == ref), ref, got, labels, "differ")
    with np.errstate(invalid="ignore"):
        got = got.astype(np.float64)
        same = (got == ref) & (np.signbit(got) == np.signbit(ref))   # +0 and -0 differ
    # Every non-NaN code of these dtypes has its own value (and sign), so equal values with equal
    # signs are equal bits; any NaN equals any NaN (GPU conversions make one canonical NaN).
    return _mismatch(same | (np.isnan(got) & np.isnan(ref)), ref, got, labels, "differ in bits")


_COMPARE = {"allclose": _allclose, "exact": _exact, "bitwise": _bitwise}


def _topk_rows(case, check, got):
    """The rows whose id sets differ: (row, tokens involved, at a near-tie?, why)."""
    ref = case.expected[check["tensor"]].astype(np.int64)
    if got.shape != ref.shape:
        raise _Fail(f"shape {_shape(got)}, expected {_shape(ref)}")
    got = _ids(check["tensor"], got)
    ranking = {**case.inputs, **case.expected}[check["ranking"]].astype(np.float64)
    transposed = bool(check.get("transposed", False))
    ranking = ranking.T if transposed else ranking     # now (rows, candidates)
    if (ranking.ndim != 2 or ranking.shape[0] != ref.shape[0]
            or np.any((ref < 0) | (ref >= ranking.shape[-1]))):
        raise GoldenError(f"case {case.name}: ranking '{check['ranking']}' {_shape(ranking)} does "
                          f"not fit ids {_shape(ref)} (transposed = {transposed})")
    atol, rtol = float(check["atol"]), float(check["rtol"])
    rows = []
    for r in range(ref.shape[0]):
        mine, theirs = Counter(got[r].tolist()), Counter(ref[r].tolist())
        if mine == theirs:
            continue
        only_mine, only_ref = sorted((mine - theirs).elements()), sorted((theirs - mine).elements())
        head = f"row {r}: {sorted(mine.elements())}, reference {sorted(theirs.elements())}"
        tokens = {r} if not transposed else {t for t in only_mine + only_ref if 0 <= t < ranking.shape[1]}
        if max(mine.values()) > 1 or not all(0 <= a < ranking.shape[1] for a in only_mine):
            rows.append((r, tokens, False, f"{head}: an id repeats or is out of range"))
            continue
        far = [(a, b) for a in only_mine for b in only_ref
               if not abs(ranking[r, a] - ranking[r, b])
               <= atol + rtol * max(abs(ranking[r, a]), abs(ranking[r, b]))]
        why = "" if not far else (f"{head}: not a near-tie, |r[{far[0][0]}] - r[{far[0][1]}]| = "
                                  f"{abs(ranking[r, far[0][0]] - ranking[r, far[0][1]]):.3g}")
        rows.append((r, tokens, not far, why))
    return rows


def _topk_result(check, rows, ambiguous) -> CheckResult:
    # A differing row that is no near-tie still is ambiguous when an earlier selection made its
    # token ambiguous (the experts of another group, say); expert choice has one selection only.
    transposed = check.get("transposed", False)
    failed = [why for r, _, near, why in rows if not near and (transposed or r not in ambiguous)]
    result = CheckResult(check["tensor"], "topk_set", PASS, tolerance=_tol(check))
    if failed:
        result.verdict = FAIL
        result.message = failed[0] + (f" (and {len(failed) - 1} more rows)" if len(failed) > 1 else "")
    elif rows:
        result.verdict = AMBIGUOUS
        result.message = f"rows {[r for r, *_ in rows]} differ at near-ties"
    return result


def _permutation(case, check, out, ambiguous):
    """Each expert's block must hold the reference's (token, slot) pairs, in any order; the tokens
    alone where the check names no "slot" or the implementation did not produce it."""
    with_slots = check.get("slot") in out
    names = (check["tensor"], check.get("slot"), check["offsets"])

    def keys(tensors):   # (expert, token, slot) of every row whose token is not ambiguous
        return Counter((e, t, s if with_slots else "*") for t, s, e in _pairs(case, tensors, *names)
                       if t not in ambiguous)
    mine, theirs = keys(out), keys(case.expected)
    if mine != theirs:
        extra = sorted((mine - theirs).elements(), key=str)
        missing = sorted((theirs - mine).elements(), key=str)
        first = (extra or missing)[0][0]
        raise _Fail(f"expert {first}: (expert, token, slot) {extra[:4]} not in the reference's blocks, "
                    f"{missing[:4]} missing")
    left = sum(1 for t in case.expected[check["tensor"]].ravel().tolist() if t in ambiguous)
    return True, "" if with_slots else "tokens compared (no slots)", left


# ---- command line ------------------------------------------------------------------------------
def _table(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="List and show moelab golden cases.")
    parser.add_argument("golden_dir")
    parser.add_argument("--filter", default="*", metavar="GLOB", help="case names to list")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="list the cases (the default)")
    mode.add_argument("--show", metavar="NAME", help="a case's tensors and checks")
    args = parser.parse_args(argv)
    try:
        if args.show:
            case = load_case(args.golden_dir, args.show)
            print(f"{case.name}: {case.entry.get('description', '')}")
            print(_table([("tensor", "dtype", "shape")] +
                         [(t, case.dtypes[t], list(a.shape)) for t, a in case.raw.items()]))
            print("checks:")
            for check in case.checks:
                extra = {k: v for k, v in check.items() if k not in ("tensor", "compare")}
                print(f"  {check['tensor']}  {check['compare']}  {json.dumps(extra)}")
        else:
            entries = cases(args.golden_dir, args.filter)
            print(_table([("name", "component", "dtype", "description")] +
                         [(c["name"], c.get("component", ""), c.get("dtype", ""),
                           c.get("description", "")) for c in entries]))
    except GoldenError as e:
        print(f"moelab_golden: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
