"""moelab's numerics (reference/numerics.h) from Python, against numpy's own conversions and bit views."""
import unittest

import numpy as np

import moelab


def bf16_round(x):
    """Round to nearest even to bf16 by integer arithmetic on the float32 bits (finite, non-NaN x)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


class Formats(unittest.TestCase):
    def test_formats_and_info(self):
        self.assertEqual(moelab.formats(), ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"])
        bf16 = moelab.format_info("bf16")
        self.assertEqual((bf16["bits"], bf16["exponent_bits"], bf16["mantissa_bits"], bf16["bias"]), (16, 8, 7, 127))
        self.assertEqual(bf16["epsilon"], 2.0**-7)
        self.assertEqual(np.float32(bf16["max"]), np.float32((2 - 2.0**-7) * 2.0**127))
        e4m3 = moelab.format_info("fp8_e4m3")
        self.assertEqual(e4m3["max"], 448.0)
        self.assertFalse(e4m3["has_inf"])
        self.assertEqual(moelab.format_info("fp16")["max"], 65504.0)
        self.assertEqual(moelab.format_info("bfloat16")["name"], "bf16")  # alias


class Rounding(unittest.TestCase):
    def test_bf16_matches_integer_rounding(self):
        x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * np.float32(1000)
        np.testing.assert_array_equal(moelab.round_to(x, "bf16"), bf16_round(x))

    def test_fp16_matches_numpy(self):
        rng = np.random.default_rng(1)
        x = (rng.standard_normal(4096) * 3e4).astype(np.float32)  # some beyond 65504: inf (numpy warns)
        x = np.concatenate([x, np.float32([1e-7, 6e-8, 2.9e-8, -65520.0, 65519.0])])  # subnormals, ties
        with np.errstate(over="ignore"):
            expected = x.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(moelab.round_to(x, "fp16"), expected)

    def test_examples_and_shapes(self):
        np.testing.assert_array_equal(moelab.round_to([128.5, 1e6], "bf16"), np.float32([128.0, 999424.0]))
        self.assertEqual(moelab.round_to(128.5, "bf16"), 128.0)  # a scalar gives a scalar
        self.assertIsInstance(moelab.round_to(0.1, "fp32"), float)
        y = moelab.round_to(np.ones((2, 3, 4)), "fp8_e4m3")
        self.assertEqual((y.shape, y.dtype), ((2, 3, 4), np.float32))
        # Overflow: inf, or NaN in e4m3 (no inf); saturating gives the max.
        self.assertEqual(moelab.round_to(1e5, "fp16"), np.inf)
        self.assertTrue(np.isnan(moelab.round_to(1000.0, "fp8_e4m3")))
        self.assertEqual(moelab.round_to(1000.0, "fp8_e4m3", saturate=True), 448.0)

    def test_ulp(self):
        self.assertEqual(moelab.ulp(1.0, "bf16"), 2.0**-7)
        self.assertEqual(moelab.ulp(130.0, "bf16"), 1.0)  # spacing in [128, 256)
        np.testing.assert_array_equal(moelab.ulp([1.0, 2.0], "fp32"), np.float32([2.0**-23, 2.0**-22]))


class Bits(unittest.TestCase):
    def test_encode_matches_numpy_views(self):
        x = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
        np.testing.assert_array_equal(moelab.encode(x, "fp32"), x.view(np.uint32))
        np.testing.assert_array_equal(moelab.encode(x, "fp16"), x.astype(np.float16).view(np.uint16).astype(np.uint32))
        np.testing.assert_array_equal(moelab.encode(x, "bf16"), bf16_round(x).view(np.uint32) >> 16)
        self.assertEqual(moelab.encode(x, "bf16").dtype, np.uint32)

    def test_every_pattern_round_trips(self):
        for dtype, width in [("bf16", 16), ("fp16", 16), ("fp8_e4m3", 8), ("fp8_e5m2", 8)]:
            bits = np.arange(1 << width, dtype=np.uint32)
            values = moelab.decode(bits, dtype)
            np.testing.assert_array_equal(moelab.encode(values, dtype), bits, err_msg=dtype)
        np.testing.assert_array_equal(moelab.decode(np.arange(1 << 16), "fp16"),
                                      np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32))

    def test_fields_and_classes(self):
        f = moelab.decompose([0x3F80, 0xBF80], "bf16")  # 1.0, -1.0
        np.testing.assert_array_equal(f["sign"], [0, 1])
        np.testing.assert_array_equal(f["exponent"], [127, 127])
        np.testing.assert_array_equal(f["mantissa"], [0, 0])
        self.assertEqual(moelab.value_class(0x7FC0, "bf16"), "nan")
        self.assertEqual(list(moelab.value_class([0, 1, 0x3F80, 0x7F80], "bf16")),
                         ["zero", "subnormal", "normal", "infinite"])
        self.assertEqual([moelab.bit_class(b, "bf16") for b in (0, 7, 15)], ["mantissa", "exponent", "sign"])

    def test_bit_flips(self):
        self.assertEqual(moelab.flip_bit(1.0, 15, "bf16"), -1.0)     # the sign
        self.assertEqual(moelab.flip_bit(1.0, 7, "bf16"), 0.5)       # lowest exponent bit: 127 -> 126
        self.assertEqual(moelab.flip_bit(1.0, 14, "bf16"), np.inf)   # top exponent bit: 127 -> 255, mantissa 0
        self.assertEqual(moelab.flip_bit(1.0, 0, "bf16"), 1.0 + 2.0**-7)
        np.testing.assert_array_equal(moelab.flip_bit_pattern([0x3F80], 15, "bf16"), [0xBF80])
        with self.assertRaises(moelab.Error):
            moelab.flip_bit(1.0, 16, "bf16")


class LowPrecisionSoftmax(unittest.TestCase):
    def test_naive_bf16_overflows_and_stable_does_not(self):
        naive = moelab.softmax_in_format([128.5, 1, 0], "bf16", "naive")
        self.assertTrue(naive["overflowed"])
        self.assertEqual(naive["overflow_count"], 1)
        self.assertEqual(naive["logits"][0], 128.0)  # 128.5 rounds to even in bf16
        stable = moelab.softmax_in_format([128.5, 1, 0], "bf16", "stable")
        self.assertFalse(stable["overflowed"])
        np.testing.assert_array_equal(stable["shifted"], np.float32([0, -127, -128]))
        self.assertEqual(stable["probs"][0], 1.0)

    def test_fp32_stable_is_the_softmax(self):
        z = np.random.default_rng(3).standard_normal(10)
        s = moelab.softmax_in_format(z, "fp32")
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(s["probs"], p, rtol=2e-6)
        self.assertAlmostEqual(s["sum"], float(np.exp(z - z.max()).sum()), places=5)


class RandomNumbers(unittest.TestCase):
    def test_splitmix64(self):
        # SplitMix64 with seed 0: the first output is hash64(0) (Steele, Lea & Flood 2014 reference values).
        self.assertEqual(moelab.Rng(0).next_u64(), 0xE220A8397B1DCDAF)
        self.assertEqual(moelab.hash64(0), 0xE220A8397B1DCDAF)
        r = moelab.Rng(7)
        a = r.normal((3, 2))
        self.assertEqual(a.shape, (3, 2))
        b = moelab.Rng(7).normal(6)
        np.testing.assert_array_equal(a.ravel(), b)  # row-major, the same stream
        # SplitMix64 written out again (reference/random.h): the same uniforms and Box-Muller normals.
        mask, golden = (1 << 64) - 1, 0x9E3779B97F4A7C15

        def mix(z):
            z = (z + golden) & mask
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            return z ^ (z >> 31)

        state, uniforms = 12345, []
        for _ in range(2000):
            uniforms.append((mix(state) >> 11) * 2.0**-53)
            state = (state + golden) & mask
        np.testing.assert_array_equal(moelab.Rng(12345).uniform(2000), uniforms)
        u1, u2 = 1.0 - np.array(uniforms[0::2]), np.array(uniforms[1::2])
        normals = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        np.testing.assert_allclose(moelab.Rng(12345).normal(1000), normals, rtol=1e-14, atol=1e-15)


if __name__ == "__main__":
    unittest.main()
