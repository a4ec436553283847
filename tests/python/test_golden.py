"""The golden values from Python (tools/golden/golden.h): the manifest, a case's arrays, `moelab check`, and
the comparison of a student's own arrays."""
import json
import os
import unittest

import numpy as np

import moelab
from moelab_testing import GOLDEN_DIR


class Manifest(unittest.TestCase):
    def test_cases_and_pattern(self):
        with open(os.path.join(GOLDEN_DIR, "manifest.json")) as f:
            manifest = json.load(f)
        everything = moelab.golden_cases(GOLDEN_DIR)
        self.assertEqual([c["name"] for c in everything], [c["name"] for c in manifest["cases"]])
        bf16 = moelab.golden_cases(GOLDEN_DIR, "*.routing.bf16")
        self.assertGreater(len(bf16), 5)
        self.assertTrue(all(c["name"].endswith(".routing.bf16") and c["dtype"] == "bf16" for c in bf16))
        entry = bf16[0]
        for key in ("name", "file", "component", "preset", "description", "seed", "config", "tensors", "checks"):
            self.assertIn(key, entry)

    def test_load_case(self):
        case = moelab.load_golden_case(GOLDEN_DIR, "mixtral.layer.bf16")
        self.assertEqual(case["component"], "layer")
        self.assertEqual(case["inputs"]["x"].dtype, np.float32)
        # BF16 inputs arrive as float32 holding bf16 values exactly.
        np.testing.assert_array_equal(moelab.round_to(case["inputs"]["x"], "bf16"), case["inputs"]["x"])
        self.assertIs(case["params"]["router.weight"], case["tensors"]["param.router.weight"])
        self.assertEqual(case["expected"]["output.y"].dtype, np.float64)
        self.assertEqual(case["expected"]["output.topk_ids"].dtype.kind, "i")
        self.assertNotIn("input.x", case["expected"])
        with self.assertRaisesRegex(moelab.Error, "nope"):
            moelab.load_golden_case(GOLDEN_DIR, "nope")


class Checking(unittest.TestCase):
    def test_reference_on_the_case_passes_and_a_wrong_value_fails(self):
        case = moelab.load_golden_case(GOLDEN_DIR, "mixtral.layer.fp32")
        out = moelab.layer_forward(case["inputs"]["x"], case["params"], case["config"])
        np.testing.assert_allclose(out["y"], case["expected"]["output.y"], rtol=1e-4, atol=1e-6)
        g = moelab.layer_backward(case["inputs"]["dy"], case["inputs"]["x"], case["params"], case["config"])
        produced = {"output.y": out["y"], "output.topk_ids": out["ids"], "output.gates": out["gates"],
                    "grad.x": g["dx"], "grad.router.weight": g["router.weight"]}
        row = moelab.check_golden_arrays(GOLDEN_DIR, case["name"], produced)
        self.assertEqual(row["verdict"], "pass", row)
        verdicts = {c["tensor"]: c["verdict"] for c in row["checks"]}
        self.assertEqual(verdicts["output.y"], "pass")
        self.assertEqual(verdicts["grad.x"], "pass")
        self.assertEqual(verdicts["output.scores"], "not supported")  # not produced: never a failure

        wrong = out["y"].copy()
        wrong[3, 5] += 1e-2
        row = moelab.check_golden_arrays(GOLDEN_DIR, case["name"], {"output.y": wrong})
        self.assertEqual(row["verdict"], "FAIL")
        bad = [c for c in row["checks"] if c["verdict"] == "FAIL"]
        self.assertEqual([c["tensor"] for c in bad], ["output.y"])
        self.assertGreater(bad[0]["worst"], 1.0)

        with self.assertRaisesRegex(moelab.Error, r"produced\['output.nope'\]"):
            moelab.check_golden_arrays(GOLDEN_DIR, case["name"], {"output.nope": wrong})
        self.assertEqual(moelab.check_golden_arrays(GOLDEN_DIR, case["name"], {})["verdict"], "not supported")

    def test_bitwise_conversions(self):
        case = moelab.load_golden_case(GOLDEN_DIR, "numerics.encode.bf16")
        x = case["inputs"]["values"]
        bits = moelab.encode(x, "bf16")
        self.assertEqual(moelab.check_golden_arrays(GOLDEN_DIR, case["name"], {"output.bits": bits})["verdict"], "pass")
        bits[0] ^= 1
        self.assertEqual(moelab.check_golden_arrays(GOLDEN_DIR, case["name"], {"output.bits": bits})["verdict"], "FAIL")
        # Values instead of bits are encoded to the expected dtype first.
        row = moelab.check_golden_arrays(GOLDEN_DIR, case["name"], {"output.bits": moelab.round_to(x, "bf16")})
        self.assertEqual(row["verdict"], "pass")

    def test_check_golden_cpu(self):
        rows = moelab.check_golden(GOLDEN_DIR, "cpu", "*.routing.fp32")
        self.assertGreater(len(rows), 5)
        for r in rows:
            self.assertIn(r["verdict"], ("pass", "ambiguous"), r)
            self.assertTrue(r["checks"])
        with self.assertRaisesRegex(moelab.Error, "pattern"):
            moelab.check_golden(GOLDEN_DIR, "cpu", "nothing.*")
        with self.assertRaisesRegex(moelab.Error, "impl"):
            moelab.check_golden(GOLDEN_DIR, "tpu", "*")


if __name__ == "__main__":
    unittest.main()
