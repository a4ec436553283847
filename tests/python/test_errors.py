"""Bad input from Python: a moelab.Error (a ValueError) naming the argument or the field, with the C++ message;
never a crash."""
import unittest

import numpy as np

import moelab


class ErrorType(unittest.TestCase):
    def test_error_is_a_value_error(self):
        self.assertTrue(issubclass(moelab.Error, ValueError))
        self.assertTrue(issubclass(moelab.NotSupported, RuntimeError))

    def test_cpp_messages_arrive_unchanged(self):
        with self.assertRaises(moelab.Error) as e:
            moelab.preset("nope")
        self.assertTrue(str(e.exception).startswith('preset = "nope": is not a known preset; choose one of switch,'))
        cfg = moelab.preset("mixtral")
        cfg["routing"]["top_k"] = 9
        with self.assertRaisesRegex(moelab.Error, "^top_k = 9: must not exceed num_experts = 8$"):
            moelab.validate_layer_config(cfg)
        with self.assertRaisesRegex(moelab.Error, r"^layer\.routing\.top_k = \"a\": must be an integer$"):
            moelab.validate_layer_config(dict(cfg, routing=dict(cfg["routing"], top_k="a")))
        with self.assertRaisesRegex(moelab.Error, r"layer\.routing\.topk = 2: is not a field of layer\.routing"):
            moelab.validate_layer_config(dict(cfg, routing=dict(cfg["routing"], topk=2)))
        with self.assertRaisesRegex(moelab.Error, "dtype"):
            moelab.round_to(1.0, "fp12")
        with self.assertRaisesRegex(moelab.Error, "topk = 3: is not an override of preset"):
            moelab.preset("mixtral", topk=3)


class ArrayArguments(unittest.TestCase):
    def setUp(self):
        self.cfg = moelab.preset("mixtral")
        self.w = np.zeros((8, 16), np.float32)

    def test_shapes_name_the_argument(self):
        with self.assertRaisesRegex(moelab.Error, r"^x = \(4, 15\): must be \(T, hidden_size\) = \(any, 16\)$"):
            moelab.route(np.zeros((4, 15)), self.w, self.cfg)
        with self.assertRaisesRegex(moelab.Error, r"^x = shape \(16,\): must be 2-d$"):
            moelab.route(np.zeros(16), self.w, self.cfg)
        with self.assertRaisesRegex(moelab.Error, r"^router_weight = \(8, 15\): must be \(num_experts, hidden_size\)"):
            moelab.route(np.zeros((4, 16)), np.zeros((8, 15)), self.cfg)
        with self.assertRaisesRegex(moelab.Error, r"^dgates = \(4, 3\): must be gates' shape = \(4, 2\)$"):
            moelab.route_backward(np.zeros((4, 3)), np.zeros((4, 16)), self.w, self.cfg)
        with self.assertRaisesRegex(moelab.Error, r"token_ids"):
            moelab.route(np.zeros((4, 16)), self.w, moelab.preset("hash"), token_ids=[1, 2, 3])

    def test_dtypes_name_the_argument(self):
        with self.assertRaisesRegex(moelab.Error, r"^x = array of dtype complex128: must hold real numbers"):
            moelab.route(np.zeros((4, 16), complex), self.w, self.cfg)
        with self.assertRaisesRegex(moelab.Error, r"^x = array of dtype bool: must hold real numbers"):
            moelab.route(np.zeros((4, 16), bool), self.w, self.cfg)
        with self.assertRaisesRegex(moelab.Error, r"^x = array of dtype <U3: must hold real numbers"):
            moelab.route("abc", self.w, self.cfg)
        with self.assertRaisesRegex(moelab.Error, r"^ids = array of dtype float64: must hold integers"):
            moelab.expert_load(np.zeros((4, 2)), 8)
        with self.assertRaisesRegex(moelab.Error, r"^ids\[1\] = 4294967296: does not fit a 32-bit integer$"):
            moelab.expert_load(np.array([[0, 2**32]]), 8)
        with self.assertRaisesRegex(moelab.Error, "must be a moelab.Recorder"):
            moelab.route(np.zeros((4, 16)), self.w, self.cfg, recorder=[])
        with self.assertRaisesRegex(moelab.Error, "precision"):
            moelab.route(np.zeros((4, 16)), self.w, self.cfg, precision="float16")

    def test_integers_and_float64_are_converted(self):
        a = moelab.route(np.ones((2, 16), np.int64), self.w, self.cfg)
        b = moelab.route(np.ones((2, 16), np.float32), self.w, self.cfg)
        np.testing.assert_array_equal(a["logits"], b["logits"])
        c = moelab.route([[1.0] * 16] * 2, self.w.tolist(), self.cfg)  # lists
        np.testing.assert_array_equal(c["logits"], b["logits"])

    def test_parameter_dicts(self):
        p = moelab.init_layer(self.cfg)
        x = np.zeros((2, 16))
        missing = dict(p)
        del missing["experts.3.w_up"]
        with self.assertRaisesRegex(moelab.Error, r"^params\['experts.3.w_up'\] = \(missing\): is required"):
            moelab.layer_forward(x, missing, self.cfg)
        extra = dict(p, **{"experts.8.w_up": p["experts.0.w_up"]})
        with self.assertRaisesRegex(moelab.Error, r"^params\['experts.8.w_up'\] = \(given\): is not a parameter"):
            moelab.layer_forward(x, extra, self.cfg)
        wrong = dict(p, **{"experts.0.w_down": p["experts.0.w_up"]})
        with self.assertRaisesRegex(moelab.Error, r"^params\['experts.0.w_down'\] = \(32, 16\): must be"):
            moelab.layer_forward(x, wrong, self.cfg)
        with self.assertRaisesRegex(moelab.Error, "config"):
            moelab.layer_forward(x, p, "mixtral")

    def test_cpp_checks_of_values(self):
        with self.assertRaisesRegex(moelab.Error, r"nan"):
            moelab.topk(np.array([[0.1, np.nan]]), 1)
        with self.assertRaisesRegex(moelab.Error, r"ids"):
            moelab.expert_load(np.array([[0, 9]]), 8)
        with self.assertRaisesRegex(moelab.Error, r"k"):
            moelab.topk(np.zeros((2, 4)), 5)
        with self.assertRaisesRegex(moelab.Error, r"^ids\[1\] = 300: must be in \[0, vocab_size = 256\)$"):
            moelab.forward(moelab.init_model("tiny_moe"), np.array([[1, 300]]))
        with self.assertRaisesRegex(moelab.Error, r"^x = array of dtype object: must hold real numbers"):
            moelab.route({}, np.zeros((8, 16)), moelab.preset("mixtral"))


if __name__ == "__main__":
    unittest.main()
