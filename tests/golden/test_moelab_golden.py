"""Tests of golden/moelab_golden.py, the Python helper for kernel authors.

Run: /usr/bin/python3 tests/golden/test_moelab_golden.py   (Debian's python3 has numpy)

The real golden set is written by `moelab golden`; these tests build their own tiny golden folders
with a test-only safetensors writer, written here from the format description (8-byte little-endian
header length, JSON header padded with spaces to a multiple of 8, tensor bytes in order), so that
the reader is checked against an independent writer.
"""
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import unittest

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "golden"))
import moelab_golden as mg  # noqa: E402

LE = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "F8_E4M3": "u1", "F8_E5M2": "u1",
      "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "u1"}


# ---- a test-only writer ------------------------------------------------------------------------
def file_bytes(header, data: bytes) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def safetensors_bytes(tensors, metadata=None) -> bytes:
    """tensors: name -> (dtype, array of values, or of bits for BF16/F8), written in order."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, values) in tensors.items():
        a = np.asarray(values)
        raw = a.astype(LE[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return file_bytes(header, data)


def write(path, content: bytes) -> str:
    with open(path, "wb") as f:
        f.write(content)
    return path


def golden_dir(tmp, cases, version=1):
    """cases: list of (name, tensors as for safetensors_bytes, checks, extra manifest fields)."""
    entries = []
    for name, tensors, checks, extra in cases:
        write(os.path.join(tmp, name + ".safetensors"), safetensors_bytes(tensors))
        entry = {"name": name, "file": name + ".safetensors", "component": "router", "preset": "test",
                 "description": f"case {name}", "seed": 1, "dtype": "f32", "config": {"experts": 4},
                 "tensors": [{"name": n, "dtype": d, "shape": list(np.shape(v))} for n, (d, v) in tensors.items()],
                 "checks": checks}
        entry.update(extra)
        entries.append(entry)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"format_version": version, "moelab_version": "0.1.0", "cases": entries}, f)
    return tmp


class Temp(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def case(self, tensors, checks, name="c", extra=None):
        golden_dir(self.tmp, [(name, tensors, checks, extra or {})])
        return mg.load_case(self.tmp, name)


# ---- the reader --------------------------------------------------------------------------------
class ReaderValid(Temp):
    def test_every_dtype(self):
        path = write(os.path.join(self.tmp, "all.safetensors"), safetensors_bytes({
            "f64": ("F64", [1.0 / 3, -2.5]), "f32": ("F32", [[0.1, 2.0], [3.0, -0.0]]),
            "f16": ("F16", [65504.0, 2.0 ** -24]), "bf16": ("BF16", [0x3F80, 0xC000, 0x0001, 0x8000, 0x7F80]),
            "e4m3": ("F8_E4M3", [0x7E, 0x01, 0x7F, 0xFF, 0x38, 0x08, 0x07, 0x80, 0xBE, 0x77]),
            "e5m2": ("F8_E5M2", [0x7B, 0x7C, 0xFC, 0x7D, 0x01, 0x3C, 0x04, 0x80]),
            "i64": ("I64", [-(2 ** 62), 7]), "i32": ("I32", [[-3], [2 ** 31 - 1]]), "u8": ("U8", [255, 0]),
            "bool": ("BOOL", [1, 0, 1]), "scalar": ("F64", 42.5), "empty": ("F32", np.zeros((0, 3))),
        }, metadata={"producer": "test"}))
        t, meta = mg.read_safetensors(path)
        self.assertEqual(meta, {"producer": "test"})
        self.assertEqual(t["f64"].dtype, np.float64)
        self.assertEqual(t["f64"].tolist(), [1.0 / 3, -2.5])
        self.assertEqual(t["f32"].dtype, np.float32)
        self.assertEqual(t["f32"].tolist(), [[np.float32(0.1), 2.0], [3.0, 0.0]])
        self.assertTrue(np.signbit(t["f32"][1, 1]))
        self.assertEqual(t["f16"].dtype, np.float16)
        self.assertEqual(t["f16"].astype(float).tolist(), [65504.0, 2.0 ** -24])
        # bf16: the top 16 bits of a float32
        self.assertEqual(t["bf16"].dtype, np.float32)
        self.assertEqual(t["bf16"].tolist(), [1.0, -2.0, 2.0 ** -133, -0.0, math.inf])
        self.assertTrue(np.signbit(t["bf16"][3]))
        # e4m3 (bias 7, no inf): 0x7E = 1.75 * 2^8 = 448 (max), 0x01 = 2^-9 (min subnormal),
        # 0x7F and 0xFF NaN, 0x38 = 1, 0x08 = 2^-6 (min normal), 0x07 = 7 * 2^-9, 0x80 = -0,
        # 0xBE = -1.75, 0x77 = 1.875 * 2^7 = 240
        e = t["e4m3"]
        self.assertEqual(e.dtype, np.float32)
        self.assertEqual(e[[0, 1, 4, 5, 6, 8, 9]].tolist(), [448.0, 2.0 ** -9, 1.0, 2.0 ** -6, 7 * 2.0 ** -9, -1.75, 240.0])
        self.assertTrue(np.isnan(e[2]) and np.isnan(e[3]))
        self.assertTrue(e[7] == 0 and np.signbit(e[7]))
        # e5m2 (bias 15, IEEE-like): 0x7B = 1.75 * 2^15 = 57344, 0x7C = inf, 0xFC = -inf, 0x7D NaN,
        # 0x01 = 2^-16, 0x3C = 1, 0x04 = 2^-14, 0x80 = -0
        e = t["e5m2"]
        self.assertEqual(e[[0, 1, 2, 4, 5, 6]].tolist(), [57344.0, math.inf, -math.inf, 2.0 ** -16, 1.0, 2.0 ** -14])
        self.assertTrue(np.isnan(e[3]))
        self.assertTrue(e[7] == 0 and np.signbit(e[7]))
        self.assertEqual(t["i64"].dtype, np.int64)
        self.assertEqual(t["i64"].tolist(), [-(2 ** 62), 7])
        self.assertEqual(t["i32"].dtype, np.int32)
        self.assertEqual(t["i32"].tolist(), [[-3], [2 ** 31 - 1]])
        self.assertEqual(t["u8"].tolist(), [255, 0])
        self.assertEqual(t["bool"].dtype, bool)
        self.assertEqual(t["bool"].tolist(), [True, False, True])
        self.assertEqual(t["scalar"].shape, ())
        self.assertEqual(float(t["scalar"]), 42.5)
        self.assertEqual(t["empty"].shape, (0, 3))
        # raw=True keeps the bits of BF16 and F8, the rest as before
        raw, _ = mg.read_safetensors(path, raw=True)
        self.assertEqual(raw["bf16"].dtype, np.uint16)
        self.assertEqual(raw["bf16"].tolist(), [0x3F80, 0xC000, 0x0001, 0x8000, 0x7F80])
        self.assertEqual(raw["e4m3"].dtype, np.uint8)
        self.assertEqual(raw["e4m3"][:3].tolist(), [0x7E, 0x01, 0x7F])
        self.assertEqual(raw["e5m2"].dtype, np.uint8)
        self.assertEqual(raw["f32"].dtype, np.float32)

    def test_e4m3_table(self):
        v = mg.decode(np.arange(256, dtype=np.uint8), "F8_E4M3").astype(np.float64)
        self.assertEqual(np.flatnonzero(np.isnan(v)).tolist(), [0x7F, 0xFF])
        self.assertFalse(np.isinf(v).any())
        self.assertEqual(np.nanmax(v), 448.0)
        self.assertEqual(np.nanmin(v), -448.0)
        pos = v[:0x7F]
        self.assertTrue(np.all(np.diff(pos) > 0))          # codes in order are values in order
        self.assertTrue(np.array_equal(v[0x80:0xFF], -pos))  # sign bit
        # every positive value is m * 2^(e - 10) with a 4-bit significand m (3 bits + hidden 1)
        for x in pos[1:]:
            m, e = math.frexp(x)
            self.assertEqual((m * 16) % 1, 0, x)

    def test_e5m2_table_is_the_top_byte_of_f16(self):
        # E5M2 has f16's exponent and bias and f16's top two mantissa bits: an independent oracle
        codes = np.arange(256, dtype=np.uint16)
        as_f16 = (codes << 8).view(np.float16).astype(np.float32)
        v = mg.decode(codes.astype(np.uint8), "F8_E5M2")
        same = (v == as_f16) | (np.isnan(v) & np.isnan(as_f16))
        self.assertTrue(same.all())
        self.assertTrue(np.array_equal(np.signbit(v), np.signbit(as_f16)))
        self.assertEqual(int(np.isnan(v).sum()), 6)
        self.assertEqual(int(np.isinf(v).sum()), 2)

    def test_bf16_decoding_is_exact(self):
        bits = np.array([0x3F81, 0x4049, 0x7F7F, 0xFFC1], np.uint16)
        v = mg.decode(bits, "BF16")
        self.assertEqual(v[0], 1 + 2.0 ** -7)
        self.assertEqual(v[1], 3.140625)
        self.assertEqual(v[2], (2 - 2.0 ** -7) * 2.0 ** 127)
        self.assertTrue(np.isnan(v[3]))


class ReaderRejects(Temp):
    def expect(self, content, *words):
        path = write(os.path.join(self.tmp, "bad.safetensors"), content)
        with self.assertRaises(mg.GoldenError) as ctx:
            mg.read_safetensors(path)
        message = str(ctx.exception)
        self.assertIn(path, message)
        for w in words:
            self.assertIn(w, message)
        return message

    def entry(self, **fields):
        e = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        e.update(fields)
        return e

    def test_golden_error_is_a_value_error(self):
        self.assertTrue(issubclass(mg.GoldenError, ValueError))

    def test_short_file(self):
        self.expect(b"\x01\x00\x00", "3 bytes", "8")

    def test_header_length(self):
        self.expect(struct.pack("<Q", 100) + b"{}      ", "header length 100", "past the end")
        self.expect(struct.pack("<Q", 200_000_000) + b"{}      ", "100 MB")

    def test_header_not_utf8_json_object(self):
        self.expect(file_bytes(b'{"\xff": 1}', b""), "not UTF-8")
        self.expect(file_bytes(b'{"a": ', b""), "not valid JSON")
        self.expect(file_bytes(b'[1, 2]', b""), "not a JSON object")
        self.expect(file_bytes(b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},'
                               b' "a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', b""), "duplicate key 'a'")

    def test_entry_fields(self):
        self.expect(file_bytes({"x": [1]}, b""), "tensor 'x'", "not a JSON object")
        for key in ("dtype", "shape", "data_offsets"):
            e = self.entry()
            del e[key]
            self.expect(file_bytes({"x": e}, bytes(8)), "tensor 'x'", f"lacks '{key}'")
        self.expect(file_bytes({"x": self.entry(stride=[1])}, bytes(8)), "tensor 'x'", "unknown field", "stride")
        self.expect(file_bytes({"x": self.entry(dtype="F4")}, bytes(8)), "tensor 'x'", "unknown dtype 'F4'")
        self.expect(file_bytes({"x": self.entry(shape=[-2])}, bytes(8)), "tensor 'x'", "shape")
        self.expect(file_bytes({"x": self.entry(shape=[2.0])}, bytes(8)), "tensor 'x'", "shape")
        self.expect(file_bytes({"x": self.entry(shape=[True])}, bytes(8)), "tensor 'x'", "shape")
        self.expect(file_bytes({"x": self.entry(data_offsets=[8, 0])}, bytes(8)), "tensor 'x'", "begin <= end")
        self.expect(file_bytes({"x": self.entry(data_offsets=[0])}, bytes(8)), "tensor 'x'", "data_offsets")

    def test_offsets_outside_or_wrong_size(self):
        self.expect(file_bytes({"x": self.entry(data_offsets=[0, 16], shape=[4])}, bytes(8)),
                    "tensor 'x'", "past the data buffer")
        self.expect(file_bytes({"x": self.entry(data_offsets=[0, 12])}, bytes(12)),
                    "tensor 'x'", "12 bytes", "F32", "[2]", "need 8")
        self.expect(file_bytes({"x": self.entry(dtype="F64")}, bytes(8)), "tensor 'x'", "need 16")

    def test_overlap_and_holes(self):
        a = self.entry()
        self.expect(file_bytes({"a": a, "b": self.entry(data_offsets=[4, 12])}, bytes(12)), "overlaps")
        self.expect(file_bytes({"a": a, "b": self.entry(data_offsets=[12, 20])}, bytes(20)), "tensor 'b'", "holes")
        self.expect(file_bytes({"a": self.entry(data_offsets=[4, 12])}, bytes(12)), "tensor 'a'", "holes")
        self.expect(file_bytes({"a": a}, bytes(12)), "[8, 12)", "holes")

    def test_metadata_and_bool(self):
        self.expect(file_bytes({"__metadata__": {"n": 1}}, b""), "__metadata__")
        self.expect(file_bytes({"__metadata__": [1]}, b""), "__metadata__")
        self.expect(file_bytes({"b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02"),
                    "tensor 'b'", "BOOL")

    def test_missing_file(self):
        with self.assertRaisesRegex(mg.GoldenError, "cannot read"):
            mg.read_safetensors(os.path.join(self.tmp, "nope.safetensors"))


# ---- manifest and cases ------------------------------------------------------------------------
def router_tensors():
    return {"input.x": ("BF16", np.array([[0x3F80, 0x4000], [0xBF80, 0x0000]])),   # [[1, 2], [-1, 0]]
            "param.router.weight": ("F32", [[0.5, -1.0], [2.0, 0.25]]),
            "input.token_ids": ("I32", [3, 9]),
            "output.logits": ("F64", [[2.5, -0.5], [-0.5, 1.0]]),
            "output.topk_ids": ("I64", [[0], [1]])}


class Manifest(Temp):
    def test_load_case(self):
        checks = [{"tensor": "output.logits", "compare": "allclose", "atol": 1e-6, "rtol": 1e-6, "nmse": 1e-12}]
        case = self.case(router_tensors(), checks, name="t.router.bf16", extra={"dtype": "bf16"})
        self.assertEqual(sorted(case.inputs), ["input.token_ids", "input.x", "param.router.weight"])
        self.assertEqual(sorted(case.expected), ["output.logits", "output.topk_ids"])
        self.assertEqual(case.inputs["input.x"].dtype, np.float32)
        self.assertEqual(case.inputs["input.x"].tolist(), [[1.0, 2.0], [-1.0, 0.0]])
        self.assertEqual(case.raw["input.x"].dtype, np.uint16)
        self.assertEqual(case.dtypes["input.x"], "BF16")
        self.assertEqual(case.inputs["input.token_ids"].dtype, np.int32)
        self.assertEqual(case.expected["output.logits"].dtype, np.float64)
        self.assertEqual(case.dtype, "bf16")
        self.assertEqual(case.config, {"experts": 4})
        self.assertEqual(case.name, "t.router.bf16")
        self.assertEqual(case.entry["component"], "router")
        self.assertEqual(case.checks, checks)

    def test_low_precision_inputs_decode_to_float32(self):
        case = self.case({"input.a": ("F16", [1.5, -65504.0]), "input.b": ("F8_E4M3", [0x7E, 0xB8]),
                          "param.c": ("F8_E5M2", [0x7B]), "param.d": ("F64", [0.1]),
                          "output.e": ("BF16", [0x3F80])}, [])
        self.assertEqual({n: a.dtype for n, a in case.inputs.items()},
                         {"input.a": np.float32, "input.b": np.float32, "param.c": np.float32, "param.d": np.float64})
        self.assertEqual(case.inputs["input.a"].tolist(), [1.5, -65504.0])
        self.assertEqual(case.inputs["input.b"].tolist(), [448.0, -1.0])
        self.assertEqual(case.inputs["param.c"].tolist(), [57344.0])
        self.assertEqual(case.expected["output.e"].tolist(), [1.0])
        self.assertEqual(case.raw["input.b"].tolist(), [0x7E, 0xB8])

    def test_cases_glob(self):
        golden_dir(self.tmp, [(n, {"output.y": ("F64", [1.0])}, [], {})
                              for n in ("mixtral.layer.bf16", "mixtral.router.f32", "switch.layer.f32")])
        self.assertEqual([c["name"] for c in mg.cases(self.tmp)],
                         ["mixtral.layer.bf16", "mixtral.router.f32", "switch.layer.f32"])
        self.assertEqual([c["name"] for c in mg.cases(self.tmp, "*.layer.*")], ["mixtral.layer.bf16", "switch.layer.f32"])
        self.assertEqual([c["name"] for c in mg.cases(self.tmp, "mixtral.*")], ["mixtral.layer.bf16", "mixtral.router.f32"])
        self.assertEqual(mg.cases(self.tmp, "nothing*"), [])

    def test_format_version(self):
        golden_dir(self.tmp, [], version=2)
        with self.assertRaisesRegex(mg.GoldenError, "format_version 2 is not supported"):
            mg.load_manifest(self.tmp)
        golden_dir(self.tmp, [], version=True)   # JSON true is not the integer 1
        with self.assertRaisesRegex(mg.GoldenError, "format_version"):
            mg.load_manifest(self.tmp)
        golden_dir(self.tmp, [], version=1)
        self.assertEqual(mg.load_manifest(self.tmp)["cases"], [])

    def test_bad_manifests(self):
        with self.assertRaisesRegex(mg.GoldenError, "manifest.json: cannot read"):
            mg.load_manifest(self.tmp)
        write(os.path.join(self.tmp, "manifest.json"), b"{")
        with self.assertRaisesRegex(mg.GoldenError, "not valid JSON"):
            mg.load_manifest(self.tmp)
        write(os.path.join(self.tmp, "manifest.json"), b'{"format_version": 1, "cases": [{"name": "a", "file": "../a"}]}')
        with self.assertRaisesRegex(mg.GoldenError, "case 0"):
            mg.load_manifest(self.tmp)

    def test_case_must_match_manifest(self):
        golden_dir(self.tmp, [("c", router_tensors(), [], {})])
        with self.assertRaisesRegex(mg.GoldenError, "no case named 'd'"):
            mg.load_case(self.tmp, "d")
        manifest_path = os.path.join(self.tmp, "manifest.json")
        with open(manifest_path) as f:
            original = json.load(f)

        def expect(edit, *words):
            m = json.loads(json.dumps(original))
            edit(m["cases"][0])
            with open(manifest_path, "w") as f:
                json.dump(m, f)
            with self.assertRaises(mg.GoldenError) as ctx:
                mg.load_case(self.tmp, "c")
            for w in words:
                self.assertIn(w, str(ctx.exception))

        expect(lambda c: c["tensors"][0].update(dtype="F32"), "input.x", "BF16 [2, 2]", "manifest says F32 [2, 2]")
        expect(lambda c: c["tensors"][1].update(shape=[4]), "param.router.weight", "manifest says F32 [4]")
        expect(lambda c: c["tensors"].pop(), "output.topk_ids", "missing from the manifest")
        expect(lambda c: c["tensors"].append({"name": "output.z", "dtype": "F64", "shape": [1]}),
               "output.z", "missing from the file")
        expect(lambda c: c.update(checks=[{"tensor": "output.nope", "compare": "exact"}]), "check 0", "output.nope")
        expect(lambda c: c.update(checks=[{"tensor": "output.logits", "compare": "close"}]), "unknown compare 'close'")
        expect(lambda c: c.update(checks=[{"tensor": "output.logits", "compare": "allclose", "atol": 1}]), "needs 'rtol'")
        expect(lambda c: c.update(checks=[allclose("output.logits", float("nan"), 0.0)]), "atol = nan")
        expect(lambda c: c.update(checks=[{"tensor": "output.topk_ids", "compare": "topk_set", "ranking": "output.logits",
                                           "atol": 0, "rtol": 0, "transposed": 1}]), "transposed")
        expect(lambda c: c.update(checks=[allclose("output.logits", 0.0, 0.0, rows="permuted")]), "output.row_token")
        expect(lambda c: c.update(checks=[{"tensor": "output.topk_ids", "compare": "topk_set", "ranking": "output.s",
                                           "atol": 0, "rtol": 0}]), "ranking tensor 'output.s'")

    def test_prefixes(self):
        golden_dir(self.tmp, [("c", {"weights": ("F32", [1.0])}, [], {})])
        with self.assertRaisesRegex(mg.GoldenError, "'weights' has none of the prefixes"):
            mg.load_case(self.tmp, "c")


# ---- compare -----------------------------------------------------------------------------------
def allclose(tensor, atol, rtol, nmse=1.0, **more):
    return dict(tensor=tensor, compare="allclose", atol=atol, rtol=rtol, nmse=nmse, depth=1, reduction=1, **more)


class CompareAllclose(Temp):
    def test_pass_and_worst(self):
        case = self.case({"output.y": ("F64", [[1.0, -2.0], [4.0, 0.0]])}, [allclose("output.y", 0.1, 0.0)])
        r = mg.compare(case, {"output.y": np.array([[1.05, -2.0], [4.0, 0.0]], np.float32)})
        self.assertEqual(r.verdict, "pass")
        self.assertTrue(r.ok)
        c = r.checks[0]
        self.assertEqual(c.verdict, "pass")
        self.assertAlmostEqual(c.worst, float(abs(np.float32(1.05) - 1.0)) / 0.1, places=12)
        self.assertAlmostEqual(c.nmse, float(abs(np.float32(1.05) - 1.0)) ** 2 / 21.0, places=15)
        self.assertEqual(r.worst, c.worst)

    def test_boundary_is_inclusive_and_one_ulp_beyond_fails(self):
        # ref 1, atol 0.25, rtol 0.5: the bound 0.25 + 0.5 * 1 = 0.75 is exact, and so is
        # |1.75 - 1| = 0.75; the next double above 1.75 is 0.75 + 2^-52 away, exactly.
        case = self.case({"output.y": ("F64", [1.0, 1.0])}, [allclose("output.y", 0.25, 0.5)])
        at = mg.compare(case, {"output.y": np.array([1.75, 1.0])})
        self.assertEqual(at.verdict, "pass")
        self.assertEqual(at.worst, 1.0)
        beyond = mg.compare(case, {"output.y": np.array([1.0, np.nextafter(1.75, 2.0)])})
        self.assertEqual(beyond.verdict, "fail")
        self.assertFalse(beyond.ok)
        self.assertGreater(beyond.worst, 1.0)
        self.assertLess(beyond.worst, 1.0 + 1e-15)
        self.assertIn("1 of 2 beyond", beyond.checks[0].message)
        self.assertIn("(1,)", beyond.checks[0].message)

    def test_just_beyond_atol_plus_rtol_ref(self):
        ref = np.array([[3.0, -8.0, 0.5]])
        case = self.case({"output.y": ("F64", ref)}, [allclose("output.y", 1e-3, 1e-2)])
        bound = 1e-3 + 1e-2 * np.abs(ref)
        ok = mg.compare(case, {"output.y": ref + 0.999 * bound * np.array([1, -1, 1])})
        self.assertEqual(ok.verdict, "pass")
        self.assertAlmostEqual(ok.worst, 0.999, places=9)
        bad = ref.copy()
        bad[0, 1] -= 1.001 * bound[0, 1]
        r = mg.compare(case, {"output.y": bad})
        self.assertEqual(r.verdict, "fail")
        self.assertAlmostEqual(r.worst, 1.001, places=9)
        self.assertIn("(0, 1)", r.checks[0].message)

    def test_nan_and_inf_never_pass(self):
        case = self.case({"output.y": ("F64", [1.0, 2.0])}, [allclose("output.y", 1e9, 1e9)])
        for bad in (np.nan, np.inf, -np.inf):
            r = mg.compare(case, {"output.y": np.array([1.0, bad])})
            self.assertEqual(r.verdict, "fail", bad)
            self.assertEqual(r.worst, math.inf)
        # even where the reference is itself infinite
        case = self.case({"output.y": ("F64", [math.inf])}, [allclose("output.y", 1.0, 1.0)])
        self.assertEqual(mg.compare(case, {"output.y": [math.inf]}).verdict, "fail")

    def test_nmse(self):
        # every element within its bound, but the sum of squared errors is too large
        case = self.case({"output.y": ("F64", [1.0, 1.0, 1.0, 1.0])}, [allclose("output.y", 0.1, 0.0, nmse=1e-3)])
        r = mg.compare(case, {"output.y": np.full(4, 1.05)})
        self.assertEqual(r.verdict, "fail")
        self.assertAlmostEqual(r.checks[0].nmse, 0.0025, places=12)
        self.assertIn("NMSE", r.checks[0].message)
        self.assertEqual(mg.compare(case, {"output.y": np.full(4, 1.01)}).verdict, "pass")

    def test_nmse_when_the_reference_is_zero(self):
        case = self.case({"output.y": ("F64", [0.0, 0.0])}, [allclose("output.y", 0.1, 0.0, nmse=1e-4)])
        r = mg.compare(case, {"output.y": [0.0, 0.0]})
        self.assertEqual(r.verdict, "pass")
        self.assertEqual(r.checks[0].nmse, 0.0)
        r = mg.compare(case, {"output.y": [0.05, 0.0]})      # within atol, but sum out^2 = 2.5e-3
        self.assertEqual(r.verdict, "fail")
        self.assertAlmostEqual(r.checks[0].nmse, 0.0025, places=12)

    def test_zero_bound(self):
        case = self.case({"output.y": ("F64", [0.0, 2.0])}, [allclose("output.y", 0.0, 0.5)])
        self.assertEqual(mg.compare(case, {"output.y": [0.0, 2.5]}).worst, 0.5)
        r = mg.compare(case, {"output.y": [1e-300, 2.0]})
        self.assertEqual((r.verdict, r.worst), ("fail", math.inf))

    def test_shape_mismatch(self):
        case = self.case({"output.y": ("F64", [[1.0, 2.0]])}, [allclose("output.y", 1.0, 1.0)])
        r = mg.compare(case, {"output.y": [1.0, 2.0]})
        self.assertEqual(r.verdict, "fail")
        self.assertIn("shape [2], expected [1, 2]", r.checks[0].message)

    def test_not_supported(self):
        case = self.case({"output.y": ("F64", [1.0]), "output.z": ("F64", [2.0])},
                         [allclose("output.y", 0.0, 0.0), allclose("output.z", 0.0, 0.0)])
        r = mg.compare(case, {})
        self.assertEqual(r.verdict, "not supported")
        self.assertFalse(r.ok)
        self.assertEqual([c.verdict for c in r.checks], ["not supported"] * 2)
        self.assertIsNone(r.worst)
        r = mg.compare(case, {"output.y": [1.0], "output.typo": [0.0]})
        self.assertEqual(r.verdict, "pass")
        self.assertEqual([c.verdict for c in r.checks], ["pass", "not supported"])
        self.assertEqual(r.unchecked, ["output.typo"])
        self.assertIn("output.typo", str(r))

    def test_bad_produced_value(self):
        case = self.case({"output.y": ("F64", [1.0])}, [allclose("output.y", 0.0, 0.0)])
        with self.assertRaisesRegex(mg.GoldenError, "output.y"):
            mg.compare(case, {"output.y": [object()]})


class CompareExactBitwise(Temp):
    def test_exact(self):
        case = self.case({"output.counts": ("I64", [3, 0, 5, 0]), "output.keep": ("BOOL", [[1, 0], [1, 1]])},
                         [{"tensor": "output.counts", "compare": "exact"}, {"tensor": "output.keep", "compare": "exact"}])
        r = mg.compare(case, {"output.counts": np.array([3, 0, 5, 0], np.int32), "output.keep": [[True, False], [True, True]]})
        self.assertEqual(r.verdict, "pass")
        r = mg.compare(case, {"output.counts": [3, 1, 4, 0]})
        self.assertEqual(r.verdict, "fail")
        self.assertIn("2 of 4 elements differ, first at (1,): 1 vs 0", r.checks[0].message)
        self.assertEqual(r.checks[1].verdict, "not supported")
        self.assertEqual(mg.compare(case, {"output.counts": [3, 0, 5]}).verdict, "fail")

    def test_bitwise_bf16(self):
        # 1.0, NaN (one payload), -0, 2^-133 (subnormal), -inf
        bits = np.array([0x3F80, 0x7FC1, 0x8000, 0x0001, 0xFF80])
        case = self.case({"output.xb": ("BF16", bits)}, [{"tensor": "output.xb", "compare": "bitwise"}])
        values = np.array([1.0, np.nan, -0.0, 2.0 ** -133, -np.inf], np.float32)
        self.assertEqual(mg.compare(case, {"output.xb": values}).verdict, "pass")              # as values
        self.assertEqual(mg.compare(case, {"output.xb": bits.astype(np.uint16)}).verdict, "pass")  # as bits
        other_nan = bits.copy()
        other_nan[1] = 0xFFC0                                  # another NaN: NaN equals NaN
        self.assertEqual(mg.compare(case, {"output.xb": other_nan.astype(np.uint16)}).verdict, "pass")
        for i, b in ((2, 0x0000), (0, 0x3F81), (3, 0x0002), (1, 0x7F80)):   # +0, one ulp, one ulp, inf
            wrong = bits.copy()
            wrong[i] = b
            r = mg.compare(case, {"output.xb": wrong.astype(np.uint16)})
            self.assertEqual(r.verdict, "fail", hex(b))
            self.assertIn(f"first at ({i},)", r.checks[0].message)
        off = values.copy()
        off[0] = np.nextafter(np.float32(1.0), np.float32(2.0))   # a float32 no bf16 has
        self.assertEqual(mg.compare(case, {"output.xb": off}).verdict, "fail")

    def test_bitwise_fp8_and_f32(self):
        case = self.case({"output.a": ("F8_E4M3", [0x7F, 0x7E, 0x01]), "output.b": ("F8_E5M2", [0x7C, 0x7D]),
                          "output.c": ("F32", [1.5, -0.0])},
                         [{"tensor": t, "compare": "bitwise"} for t in ("output.a", "output.b", "output.c")])
        r = mg.compare(case, {"output.a": np.array([0xFF, 0x7E, 0x01], np.uint8),
                              "output.b": np.array([np.inf, np.nan]),
                              "output.c": np.array([1.5, -0.0], np.float32).view(np.uint32)})
        self.assertEqual([c.verdict for c in r.checks], ["pass"] * 3)
        r = mg.compare(case, {"output.a": np.array([0x7F, 0x7E, 0x02], np.uint8),
                              "output.b": np.array([0x7B, 0x7D], np.uint8),
                              "output.c": np.array([1.5, 0.0])})
        self.assertEqual([c.verdict for c in r.checks], ["fail"] * 3)


# A token-choice routing case: T = 4 tokens, E = 4 experts, k = 2.
SCORES = np.array([[0.50, 0.30, 0.15, 0.05],
                   [0.10, 0.40, 0.40 - 1e-9, 0.10 + 1e-9],   # experts 1 and 2 tie within 1e-9
                   [0.05, 0.15, 0.30, 0.50],
                   [0.35, 0.05, 0.25, 0.35]])                # experts 0 and 3 tie for first
IDS = np.array([[0, 1], [1, 2], [3, 2], [0, 3]])
GATES = np.array([[0.625, 0.375], [0.5, 0.5], [0.625, 0.375], [0.5, 0.5]])
# pairs (token, slot) in expert-major order; within an expert in pair order
ROW_TOKEN = np.array([0, 3, 0, 1, 1, 2, 2, 3])
ROW_SLOT = np.array([0, 0, 1, 0, 1, 1, 0, 1])
OFFSETS = np.array([0, 2, 4, 6, 8])
EXPERT_OUT = np.arange(16, dtype=np.float64).reshape(8, 2)


def routing_case(test, extra_checks=()):
    tensors = {"input.x": ("F32", np.ones((4, 2))), "output.scores": ("F64", SCORES),
               "output.topk_ids": ("I32", IDS), "output.gates": ("F64", GATES),
               "output.row_token": ("I32", ROW_TOKEN), "output.row_slot": ("I32", ROW_SLOT),
               "output.offsets": ("I64", OFFSETS), "output.counts": ("I64", [2, 2, 2, 2]),
               "output.expert_out": ("F64", EXPERT_OUT), "output.y": ("F64", np.arange(8.0).reshape(4, 2)),
               "output.aux_loss": ("F64", 0.75)}
    checks = [{"tensor": "output.topk_ids", "compare": "topk_set", "ranking": "output.scores", "atol": 1e-6, "rtol": 0.0},
              allclose("output.gates", 1e-9, 0.0, rows="token", align="output.topk_ids"),
              allclose("output.y", 1e-9, 0.0, rows="token"),
              allclose("output.aux_loss", 1e-9, 0.0),
              {"tensor": "output.counts", "compare": "exact", "rows": "all"},
              {"tensor": "output.row_token", "compare": "permutation", "slot": "output.row_slot",
               "offsets": "output.offsets"},
              allclose("output.expert_out", 1e-9, 0.0, rows="permuted")] + list(extra_checks)
    return test.case(tensors, checks)


def reference_outputs():
    return {"output.topk_ids": IDS, "output.gates": GATES, "output.y": np.arange(8.0).reshape(4, 2),
            "output.aux_loss": 0.75, "output.counts": [2, 2, 2, 2], "output.row_token": ROW_TOKEN,
            "output.row_slot": ROW_SLOT, "output.offsets": OFFSETS, "output.expert_out": EXPERT_OUT}


class CompareRouting(Temp):
    def verdicts(self, report):
        return {c.tensor: c.verdict for c in report.checks}

    def test_reference_passes(self):
        case = routing_case(self)
        r = mg.compare(case, reference_outputs())
        self.assertEqual(r.verdict, "pass", str(r))
        self.assertEqual(set(self.verdicts(r).values()), {"pass"})
        self.assertEqual(r.ambiguous_tokens, [])
        self.assertEqual(r.unchecked, [])

    def test_topk_any_order_and_aligned_gates(self):
        # the kernel orders each token's experts by id, and its gates, slots and blocks accordingly
        case = routing_case(self)
        out = reference_outputs()
        out["output.topk_ids"] = np.sort(IDS, axis=1)                         # token 2: [2, 3]
        out["output.gates"] = np.array([[0.625, 0.375], [0.5, 0.5], [0.375, 0.625], [0.5, 0.5]])
        slot = out["output.row_slot"].copy()
        slot[[5, 6]] = [0, 1]                                                 # token 2's slots swap
        out["output.row_slot"] = slot
        r = mg.compare(case, out)
        self.assertEqual(r.verdict, "pass", str(r))
        # the same gates in the reference's order are now misaligned with the kernel's ids
        out["output.gates"] = GATES
        r = mg.compare(case, out)
        self.assertEqual(self.verdicts(r)["output.gates"], "fail")
        self.assertIn("(2, 0)", r.checks[1].message)

    def test_wrong_ids_far_from_a_tie_fail(self):
        case = routing_case(self)
        out = reference_outputs()
        ids = IDS.copy()
        ids[1] = [1, 3]          # expert 3 (score 0.1 + 1e-9) for expert 2 (0.4 - 1e-9): far
        out["output.topk_ids"] = ids
        r = mg.compare(case, out)
        self.assertEqual(self.verdicts(r)["output.topk_ids"], "fail")
        self.assertIn("row 1", r.checks[0].message)
        self.assertIn("not a near-tie", r.checks[0].message)
        self.assertEqual(r.ambiguous_tokens, [])
        ids = IDS.copy()
        ids[3] = [3, 2]          # expert 2 (0.25) for expert 0 (0.35)
        out["output.topk_ids"] = ids
        self.assertEqual(mg.compare(case, out).verdict, "fail")

    def test_swapped_ids_at_a_near_tie(self):
        # token 1's second choice, expert 2, beats expert 3 by 1e-9 (ranking atol 1e-6): a kernel
        # that picks expert 3 is not wrong; token 1 is left out of everything else
        scores = SCORES.copy()
        scores[1] = [0.10, 0.40, 0.30, 0.30 - 1e-9]     # expert 2 beats expert 3 by 1e-9
        tensors_case = routing_case(self)
        tensors = {n: (tensors_case.dtypes[n], tensors_case.raw[n]) for n in tensors_case.raw}
        tensors["output.scores"] = ("F64", scores)
        case = self.case(tensors, tensors_case.checks)
        out = reference_outputs()
        ids = IDS.copy()
        ids[1] = [3, 1]                                  # expert 3 instead of 2: a near-tie
        out["output.topk_ids"] = ids
        out["output.gates"] = np.array([[0.625, 0.375], [123.0, 0.5], [0.625, 0.375], [0.5, 0.5]])
        out["output.y"] = np.array([[0.0, 1.0], [99.0, 99.0], [4.0, 5.0], [6.0, 7.0]])  # token 1: anything
        out["output.counts"] = [2, 2, 1, 3]
        # expert 2 loses token 1 (row 4), expert 3 gains it
        out["output.row_token"] = np.array([0, 3, 0, 1, 2, 2, 3, 1])
        out["output.row_slot"] = np.array([0, 0, 1, 1, 1, 0, 1, 0])
        out["output.offsets"] = np.array([0, 2, 4, 5, 8])
        out["output.expert_out"] = np.array([[0, 1], [2, 3], [4, 5], [6, 7], [10, 11], [12, 13], [14, 15], [-1, -1]], float)
        r = mg.compare(case, out)
        self.assertEqual(r.verdict, "ambiguous", str(r))
        self.assertTrue(r.ok)
        self.assertEqual(r.ambiguous_tokens, [1])
        v = self.verdicts(r)
        self.assertEqual(v["output.topk_ids"], "ambiguous")
        self.assertEqual(v["output.gates"], "pass")          # token 1's row left out
        self.assertEqual(v["output.y"], "pass")
        self.assertEqual(v["output.aux_loss"], "ambiguous")  # depends on every token
        self.assertEqual(v["output.counts"], "ambiguous")
        self.assertEqual(v["output.row_token"], "pass")      # blocks compared without token 1
        self.assertEqual(v["output.expert_out"], "pass")
        by_tensor = {c.tensor: c for c in r.checks}
        self.assertEqual(by_tensor["output.y"].left_out, 1)
        self.assertEqual(by_tensor["output.expert_out"].left_out, 2)
        self.assertEqual(by_tensor["output.row_token"].left_out, 2)
        self.assertIn("left out 1 rows", by_tensor["output.y"].message)
        # a real error elsewhere still fails, ambiguity or not
        out["output.y"] = out["output.y"] + np.array([[0], [0], [1e-6], [0]])
        r = mg.compare(case, out)
        self.assertEqual(r.verdict, "fail")
        self.assertFalse(r.ok)
        # beyond the ranking tolerance it is a failure
        scores[1, 3] = 0.30 - 1e-5
        tensors["output.scores"] = ("F64", scores)
        case = self.case(tensors, tensors_case.checks)
        r = mg.compare(case, {"output.topk_ids": ids})
        self.assertEqual(r.verdict, "fail")
        self.assertEqual(r.ambiguous_tokens, [])

    def test_only_an_all_check_after_an_ambiguous_token(self):
        scores = SCORES.copy()
        scores[1] = [0.10, 0.40, 0.30, 0.30]             # an exact tie: both answers are right
        base = routing_case(self)
        tensors = {n: (base.dtypes[n], base.raw[n]) for n in base.raw}
        tensors["output.scores"] = ("F64", scores)
        case = self.case(tensors, base.checks)
        ids = IDS.copy()
        ids[1] = [1, 3]
        r = mg.compare(case, {"output.topk_ids": ids, "output.aux_loss": 0.75})
        self.assertEqual(self.verdicts(r)["output.aux_loss"], "ambiguous")
        self.assertIn("[1]", r.checks[3].message)
        self.assertEqual(r.verdict, "ambiguous")
        # the same loss with no ambiguous token is judged (and passes)
        r = mg.compare(case, {"output.topk_ids": IDS, "output.aux_loss": 0.75})
        self.assertEqual(r.verdict, "pass")

    def test_topk_failures(self):
        case = routing_case(self)
        for bad, words in ((np.array([[0, 0], [1, 2], [3, 2], [0, 3]]), "repeats"),
                           (np.array([[0, 9], [1, 2], [3, 2], [0, 3]]), "out of range"),
                           (np.array([[0, 1, 2], [1, 2, 0], [3, 2, 0], [0, 3, 1]]), "shape"),
                           (np.array([[0.5, 1], [1, 2], [3, 2], [0, 3]]), "integer")):
            r = mg.compare(case, {"output.topk_ids": bad})
            self.assertEqual(r.verdict, "fail", words)
            self.assertIn(words, r.checks[0].message)

    def test_permutation(self):
        case = routing_case(self)
        out = {"output.row_token": ROW_TOKEN[[1, 0, 2, 3, 5, 4, 7, 6]],   # each block reversed
               "output.row_slot": ROW_SLOT[[1, 0, 2, 3, 5, 4, 7, 6]],
               "output.expert_out": EXPERT_OUT[[1, 0, 2, 3, 5, 4, 7, 6]]}
        r = mg.compare(case, out)
        self.assertEqual(r.verdict, "pass", str(r))
        self.assertEqual(self.verdicts(r)["output.row_token"], "pass")
        self.assertEqual(self.verdicts(r)["output.expert_out"], "pass")
        # the same rows in another order without the kernel's own pairs: matched by position, fails
        r = mg.compare(case, {"output.expert_out": out["output.expert_out"]})
        self.assertEqual(r.verdict, "fail")
        # a block holding a pair of another expert: token 3 slot 0 (expert 0) and token 0 slot 1
        # (expert 1) swap blocks
        tokens, slots = ROW_TOKEN.copy(), ROW_SLOT.copy()
        tokens[[1, 2]], slots[[1, 2]] = tokens[[2, 1]], slots[[2, 1]]
        r = mg.compare(case, {"output.row_token": tokens, "output.row_slot": slots})
        self.assertEqual(r.verdict, "fail")
        self.assertIn("expert 0", r.checks[5].message)
        # tokens alone (no slots produced) are still compared per block
        r = mg.compare(case, {"output.row_token": tokens})
        self.assertEqual(r.verdict, "fail")
        r = mg.compare(case, {"output.row_token": ROW_TOKEN[[1, 0, 2, 3, 4, 5, 6, 7]]})
        self.assertEqual(r.verdict, "pass")
        self.assertIn("tokens compared", r.checks[5].message)
        # offsets that do not split the rows
        r = mg.compare(case, {"output.row_token": ROW_TOKEN, "output.offsets": [0, 2, 4, 6, 7]})
        self.assertEqual(r.verdict, "fail")
        self.assertIn("offsets", r.checks[5].message)
        # a permuted row matched to the wrong reference row fails expert_out
        e = EXPERT_OUT.copy()
        e[3] += 1.0
        r = mg.compare(case, {"output.expert_out": e})
        self.assertEqual(r.verdict, "fail")
        self.assertIn("(3, 0)", r.checks[6].message)

    def test_permuted_rows_repeated_or_missing(self):
        case = routing_case(self)
        tokens, slots = ROW_TOKEN.copy(), ROW_SLOT.copy()
        tokens[1], slots[1] = tokens[0], slots[0]           # row 1 repeats row 0's pair
        r = mg.compare(case, {"output.row_token": tokens, "output.row_slot": slots, "output.expert_out": EXPERT_OUT})
        self.assertEqual(r.checks[6].verdict, "fail")
        self.assertIn("row 1: (token 0, slot 0) is repeated", r.checks[6].message)
        keep = [0, 2, 3, 4, 5, 6, 7]                          # the kernel lost pair (3, 0)
        r = mg.compare(case, {"output.row_token": ROW_TOKEN[keep], "output.row_slot": ROW_SLOT[keep],
                              "output.expert_out": EXPERT_OUT[keep]})
        self.assertEqual(r.checks[6].verdict, "fail")
        self.assertIn("1 reference rows missing, e.g. (token 3, slot 0)", r.checks[6].message)
        self.assertEqual(r.checks[5].verdict, "fail")         # and its blocks are wrong

    def test_cases_without_slots_match_by_expert_and_token(self):
        # a case that stores no output.row_slot: blocks hold tokens, rows are matched by the
        # (token, expert) pair, the expert read from the offsets (a token meets an expert once)
        base = routing_case(self)
        tensors = {n: (base.dtypes[n], base.raw[n]) for n in base.raw if n != "output.row_slot"}
        checks = [dict(c) for c in base.checks]
        del checks[5]["slot"]
        case = self.case(tensors, checks)
        order = [1, 0, 2, 3, 5, 4, 7, 6]
        r = mg.compare(case, {"output.row_token": ROW_TOKEN[order], "output.expert_out": EXPERT_OUT[order]})
        self.assertEqual(r.verdict, "pass", str(r))
        self.assertEqual(r.checks[5].message, "tokens compared (no slots)")
        # token 3 (expert 0) and token 0 (expert 1) trade blocks: both checks fail
        tokens = ROW_TOKEN.copy()
        tokens[[1, 2]] = tokens[[2, 1]]
        r = mg.compare(case, {"output.row_token": tokens, "output.expert_out": EXPERT_OUT})
        self.assertEqual([r.checks[5].verdict, r.checks[6].verdict], ["fail", "fail"])
        self.assertIn("(token 0, expert 0) is repeated", r.checks[6].message)
        # the kernel's own offsets, with rows in another expert order, are followed
        r = mg.compare(case, {"output.row_token": ROW_TOKEN, "output.offsets": [0, 1, 4, 6, 8],
                              "output.expert_out": EXPERT_OUT})
        self.assertEqual(r.verdict, "fail")
        self.assertIn("not a pair of the reference", r.checks[6].message)

    def test_expert_choice(self):
        # E = 2 experts each take C = 2 of T = 4 tokens, ranked by scores (T, E) per column
        scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.6 - 1e-9, 0.3], [0.2, 0.8]])
        ids = np.array([[0, 1], [3, 1]])
        case = self.case({"output.scores": ("F64", scores), "output.ec_ids": ("I32", ids),
                          "output.y": ("F64", np.zeros((4, 2)))},
                         [{"tensor": "output.ec_ids", "compare": "topk_set", "ranking": "output.scores",
                           "transposed": True, "atol": 1e-6, "rtol": 0.0},
                          allclose("output.y", 1e-9, 0.0, rows="token")])
        r = mg.compare(case, {"output.ec_ids": [[1, 0], [1, 3]], "output.y": np.zeros((4, 2))})
        self.assertEqual(r.verdict, "pass")
        y = np.zeros((4, 2))
        y[1] = y[2] = 5.0                                # tokens 1 and 2: the ambiguous ones
        r = mg.compare(case, {"output.ec_ids": [[0, 2], [3, 1]], "output.y": y})
        self.assertEqual(r.verdict, "ambiguous", str(r))
        self.assertEqual(r.ambiguous_tokens, [1, 2])
        self.assertEqual(r.checks[1].left_out, 2)
        r = mg.compare(case, {"output.ec_ids": [[0, 3], [3, 1]]})   # 0.2 vs 0.6: far
        self.assertEqual(r.verdict, "fail")
        self.assertIn("row 0", r.checks[0].message)
        r = mg.compare(case, {"output.ec_ids": [[0, 1], [3, 0]]})   # column 1: 0.1 vs 0.4
        self.assertEqual(r.verdict, "fail")

    def test_an_earlier_selection_makes_a_token_ambiguous(self):
        # group-limited routing: groups {0, 1} and {2, 3}; token 0's groups tie exactly, so its
        # experts may come from either group whatever their own scores
        scores = np.array([[0.5, 0.1, 0.3, 0.2], [0.5, 0.4, 0.05, 0.05]])
        group_scores = np.array([[0.5, 0.5], [0.9, 0.1]])
        case = self.case({"output.scores": ("F64", scores), "output.group_scores": ("F64", group_scores),
                          "output.group_ids": ("I32", [[0], [0]]), "output.topk_ids": ("I32", [[0, 1], [0, 1]])},
                         [{"tensor": "output.group_ids", "compare": "topk_set", "ranking": "output.group_scores",
                           "atol": 0.0, "rtol": 0.0},
                          {"tensor": "output.topk_ids", "compare": "topk_set", "ranking": "output.scores",
                           "atol": 0.0, "rtol": 0.0}])
        r = mg.compare(case, {"output.group_ids": [[1], [0]], "output.topk_ids": [[2, 3], [0, 1]]})
        self.assertEqual(r.verdict, "ambiguous", str(r))
        self.assertEqual([c.verdict for c in r.checks], ["ambiguous", "ambiguous"])
        r = mg.compare(case, {"output.group_ids": [[0], [0]], "output.topk_ids": [[2, 3], [0, 1]]})
        self.assertEqual(r.verdict, "fail")

    def test_every_row_left_out_is_ambiguous(self):
        case = self.case({"output.scores": ("F64", [[0.5, 0.5]]), "output.topk_ids": ("I32", [[0]]),
                          "output.y": ("F64", [[1.0, 2.0]])},
                         [{"tensor": "output.topk_ids", "compare": "topk_set", "ranking": "output.scores",
                           "atol": 0.0, "rtol": 0.0},
                          allclose("output.y", 0.0, 0.0, rows="token")])
        r = mg.compare(case, {"output.y": [[7.0, 7.0]]})               # no ids: token 0 is judged
        self.assertEqual(r.verdict, "fail")
        r = mg.compare(case, {"output.topk_ids": [[1]], "output.y": [[7.0, 7.0]]})
        self.assertEqual([c.verdict for c in r.checks], ["ambiguous", "ambiguous"])
        self.assertEqual(r.checks[1].left_out, 1)

    def test_report_text(self):
        case = routing_case(self)
        out = reference_outputs()
        out["output.y"] = out["output.y"] + 1.0
        r = mg.compare(case, out)
        text = str(r)
        self.assertTrue(text.startswith("case c: FAIL"))
        for word in ("output.y", "allclose", "fail", "output.counts", "exact", "atol 1e-09"):
            self.assertIn(word, text)
        self.assertEqual(len(text.splitlines()), 2 + len(case.checks))


class Verdicts(unittest.TestCase):
    def test_case_verdict_rules(self):
        def verdict(*checks):
            return mg.Report("c", [mg.CheckResult("t", "allclose", v, left_out=n) for v, n in checks], [], []).verdict
        self.assertEqual(verdict(("pass", 0), ("fail", 0), ("ambiguous", 0)), "fail")
        self.assertEqual(verdict(("pass", 0), ("ambiguous", 0), ("not supported", 0)), "ambiguous")
        self.assertEqual(verdict(("pass", 0), ("pass", 2)), "ambiguous")      # a check left rows out
        self.assertEqual(verdict(("pass", 0), ("not supported", 0)), "pass")
        self.assertEqual(verdict(("not supported", 0)), "not supported")
        self.assertEqual(verdict(), "not supported")
        ok = {v: mg.Report("c", [mg.CheckResult("t", "exact", v)], [], []).ok
              for v in ("pass", "ambiguous", "fail", "not supported")}
        self.assertEqual(ok, {"pass": True, "ambiguous": True, "fail": False, "not supported": False})


# ---- command line ------------------------------------------------------------------------------
class CommandLine(Temp):
    def run_cli(self, *args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "golden", "moelab_golden.py"), *args],
                              capture_output=True, text=True)

    def test_list_and_show(self):
        golden_dir(self.tmp, [("a.router.f32", router_tensors(), [allclose("output.logits", 0.0, 0.0)], {}),
                              ("b.layer.bf16", {"output.y": ("F64", [1.0])}, [], {"component": "layer", "dtype": "bf16"})])
        p = self.run_cli(self.tmp, "--list")
        self.assertEqual(p.returncode, 0, p.stderr)
        lines = p.stdout.splitlines()
        self.assertEqual(lines[0].split(), ["name", "component", "dtype", "description"])
        self.assertEqual(lines[1].split(), ["a.router.f32", "router", "f32", "case", "a.router.f32"])
        self.assertEqual(lines[2].split(), ["b.layer.bf16", "layer", "bf16", "case", "b.layer.bf16"])
        p = self.run_cli(self.tmp, "--filter", "*.layer.*", "--list")
        self.assertEqual(len(p.stdout.splitlines()), 2)
        p = self.run_cli(self.tmp, "--show", "a.router.f32")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("input.x", p.stdout)
        self.assertRegex(p.stdout, r"input\.x\s+BF16\s+\[2, 2\]")
        self.assertRegex(p.stdout, r"output\.topk_ids\s+I64\s+\[2, 1\]")
        self.assertIn("output.logits  allclose", p.stdout)

    def test_bad_input_exits_2_with_one_line(self):
        p = self.run_cli(os.path.join(self.tmp, "missing"), "--list")
        self.assertEqual(p.returncode, 2)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1)
        self.assertIn("manifest.json", p.stderr)
        golden_dir(self.tmp, [])
        p = self.run_cli(self.tmp, "--show", "nope")
        self.assertEqual(p.returncode, 2)
        self.assertEqual(p.stderr.strip(), f"moelab_golden: {self.tmp}: no case named 'nope' in manifest.json")


# ---- the committed set -------------------------------------------------------------------------
COMMITTED = os.environ.get("MOELAB_GOLDEN_DIR",
                           os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "golden"))


@unittest.skipUnless(os.path.exists(os.path.join(COMMITTED, "manifest.json")), "no committed golden set")
class CommittedSet(unittest.TestCase):
    """Every committed case loads, and its own expected values (ids reordered, as a kernel may)
    pass every check; one element pushed beyond its tolerance fails."""

    def test_every_case_passes_its_own_expected_values(self):
        entries = mg.cases(COMMITTED)
        self.assertGreater(len(entries), 60)
        for entry in entries:
            case = mg.load_case(COMMITTED, entry["name"])
            produced = {name: case.raw[name] if any(c["tensor"] == name and c["compare"] == "bitwise"
                                                      for c in case.checks) else value
                        for name, value in case.expected.items()}
            report = mg.compare(case, produced)
            self.assertEqual(report.verdict, mg.PASS, f"{entry['name']}\n{report}")

    def test_an_element_beyond_its_tolerance_fails(self):
        case = mg.load_case(COMMITTED, "mixtral.layer.fp32")
        check = next(c for c in case.checks if c["tensor"] == "output.y")
        y = np.array(case.expected["output.y"], dtype=np.float64)
        bound = check["atol"] + check["rtol"] * abs(y[0, 0])
        y[0, 0] += 1.5 * bound
        report = mg.compare(case, {"output.y": y})
        self.assertEqual(report.verdict, mg.FAIL)
        self.assertAlmostEqual(report.worst, 1.5, places=3)


if __name__ == "__main__":
    unittest.main()
