"""The MoE layer from Python (reference/layer.h, capacity.h, dispatch.h, experts.h): values against numpy,
gradients against finite differences in float64 (the module exposes the reference's double instantiation
through precision="float64"), round trips, and the no-copy claim of API.md."""
import unittest

import numpy as np

import moelab
from moelab_testing import central_difference


def silu(z):
    return z / (1 + np.exp(-z))


class Experts(unittest.TestCase):
    def test_swiglu_against_numpy(self):
        cfg = moelab.preset("mixtral")
        p = moelab.init_expert(cfg, seed=1, init_std=0.3)
        self.assertEqual(sorted(p), ["w_down", "w_gate", "w_up"])
        self.assertEqual(p["w_gate"].shape, (32, 16))
        x = np.random.default_rng(0).standard_normal((5, 16))
        out = moelab.expert_forward(x, p, cfg, precision="float64")
        h = silu(x @ p["w_gate"].T.astype(np.float64)) * (x @ p["w_up"].T.astype(np.float64))
        np.testing.assert_allclose(out["hidden"], h, rtol=1e-12)
        np.testing.assert_allclose(out["y"], h @ p["w_down"].T.astype(np.float64), rtol=1e-12)

    def test_backward_and_segmentation(self):
        cfg = moelab.preset("gpt_oss", hidden_size=4, intermediate_size=6)  # swiglu_clamped with biases
        p = {k: v.astype(np.float64) for k, v in moelab.init_expert(cfg, seed=2, init_std=0.5).items()}
        self.assertEqual(sorted(p), ["b_down", "b_gate", "b_up", "w_down", "w_gate", "w_up"])
        rng = np.random.default_rng(3)
        p["b_up"][:] = rng.standard_normal(6) * 0.1
        x = rng.standard_normal((3, 4))
        dy = rng.standard_normal((3, 4))
        g = moelab.expert_backward(dy, x, p, cfg, precision="float64")
        f = lambda: float((dy * moelab.expert_forward(x, p, cfg, precision="float64")["y"]).sum())  # noqa: E731
        for name, arr in [("dx", x), ("w_gate", p["w_gate"]), ("b_up", p["b_up"]), ("w_down", p["w_down"])]:
            for index in list(np.ndindex(arr.shape))[::3]:
                self.assertAlmostEqual(g[name][index], central_difference(f, arr, index, 1e-6), delta=1e-7, msg=name)
        # Fine-grained segmentation: the segments' outputs sum to the expert's.
        cfg2 = moelab.preset("mixtral", intermediate_size=32)
        p2 = moelab.init_expert(cfg2, seed=4)
        segs = moelab.segment_expert(p2, cfg2, 4)
        seg_cfg = dict(cfg2["expert"], intermediate_size=8)
        y = moelab.expert_forward(x @ np.ones((4, 16)), p2, cfg2, precision="float64")["y"]
        ys = sum(moelab.expert_forward(x @ np.ones((4, 16)), s, seg_cfg, precision="float64")["y"] for s in segs)
        np.testing.assert_allclose(ys, y, rtol=1e-6, atol=1e-12)


class CapacityAndDispatch(unittest.TestCase):
    def test_capacity_formula(self):
        self.assertEqual(moelab.capacity(16, 2, 8), 4)                       # ceil(1.0 * 16 * 2 / 8)
        self.assertEqual(moelab.capacity(50, 2, 10, capacity_factor=1.1), 11)  # 11.000000000000002 snaps to 11
        self.assertEqual(moelab.capacity(10, 1, 8, capacity_factor=1.0, rounding="floor", min_capacity=4), 4)
        self.assertEqual(moelab.round_capacity(8.999999999999998, "floor"), 9.0)
        cfg = moelab.preset("switch")
        self.assertEqual(moelab.capacity(16, 1, 8, config=cfg), 3)  # its capacity_factor 1.25: ceil(2.5)

    def test_apply_capacity_arrival_order(self):
        ids = np.array([[0, 1], [0, 2], [0, 3], [0, 1]])
        r = moelab.apply_capacity(ids, 4, capacity_factor=0.5)  # capacity ceil(0.5 * 8 / 4) = 1
        self.assertEqual(r["capacity"], 1)
        # Slot-major arrival: the first choices (all expert 0: token 0 wins), then the second choices.
        np.testing.assert_array_equal(r["keep"], [[1, 1], [0, 1], [0, 1], [0, 0]])
        np.testing.assert_array_equal(r["dropped"], [3, 1, 0, 0])
        self.assertIsNone(moelab.apply_capacity(ids, 4, dropless=True)["capacity"])

    def test_dispatch_plan_and_its_adjoints(self):
        rng = np.random.default_rng(5)
        T, k, E, C = 7, 2, 5, 3
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
        keep = (rng.random((T, k)) > 0.3).astype(np.int32)
        plan = moelab.dispatch_plan(ids, E, keep=keep)
        kept = [(t, j) for t in range(T) for j in range(k) if keep[t, j]]
        counts = np.bincount([ids[t, j] for t, j in kept], minlength=E)
        np.testing.assert_array_equal(plan["counts"], counts)
        np.testing.assert_array_equal(plan["offsets"], np.concatenate([[0], np.cumsum(counts)]))
        # Expert-major, pair order within an expert (a stable counting sort).
        order = sorted(kept, key=lambda tj: ids[tj])
        np.testing.assert_array_equal(plan["row_token"], [t for t, _ in order])
        np.testing.assert_array_equal(plan["row_slot"], [j for _, j in order])
        self.assertEqual(plan["num_rows"], len(kept))
        x = rng.standard_normal((T, C))
        np.testing.assert_array_equal(moelab.permute(x, plan, precision="float64"), x[plan["row_token"]])
        # <permute(x), d> = <x, permute_backward(d)>; <unpermute(e), d2> = <e, unpermute_backward(d2)>.
        d = rng.standard_normal((len(kept), C))
        lhs = float((moelab.permute(x, plan, precision="float64") * d).sum())
        self.assertAlmostEqual(lhs, float((x * moelab.permute_backward(d, plan, T, precision="float64")).sum()), 12)
        e = rng.standard_normal((len(kept), C))
        d2 = rng.standard_normal((T * k, C))
        per_pair = moelab.unpermute(e, plan, precision="float64")
        np.testing.assert_array_equal(per_pair[~keep.ravel().astype(bool)], 0.0)
        self.assertAlmostEqual(float((per_pair * d2).sum()),
                               float((e * moelab.unpermute_backward(d2, plan, precision="float64")).sum()), 12)

    def test_malformed_plan_is_an_error(self):
        plan = moelab.dispatch_plan(np.array([[0], [1]]), 2)
        bad = dict(plan, row_token=np.array([0, 5], np.int32))
        with self.assertRaisesRegex(moelab.Error, r"plan\['row_token'\]\[1\] = 5"):
            moelab.permute(np.zeros((2, 3)), bad)

    def test_combine(self):
        rng = np.random.default_rng(6)
        eo = rng.standard_normal((4, 3))
        w = rng.standard_normal(4)
        rt = np.array([2, 0, 2, 1])
        y = moelab.combine_forward(eo, w, rt, 3, precision="float64")
        expect = np.zeros((3, 3))
        np.add.at(expect, rt, w[:, None] * eo)
        np.testing.assert_allclose(y, expect, rtol=1e-15)
        dy = rng.standard_normal((3, 3))
        b = moelab.combine_backward(dy, eo, w, rt, precision="float64")
        np.testing.assert_allclose(b["dexpert_out"], w[:, None] * dy[rt], rtol=1e-15)
        np.testing.assert_allclose(b["drow_weight"], (dy[rt] * eo).sum(1), rtol=1e-14)


class Layer(unittest.TestCase):
    def test_forward_is_the_sum_over_kept_pairs(self):
        cfg = moelab.preset("switch", capacity_factor=0.5)  # drops tokens; relu experts
        p = moelab.init_layer(cfg, seed=1, init_std=0.3)
        x = np.random.default_rng(7).standard_normal((12, 16))
        out = moelab.layer_forward(x, p, cfg, precision="float64")
        self.assertGreater(int(out["dropped"].sum()), 0)
        y = np.zeros((12, 16))
        for t in range(12):
            for j in range(out["ids"].shape[1]):
                if out["keep"][t, j]:
                    e = out["ids"][t, j]
                    h = np.maximum(x[t] @ p[f"experts.{e}.w_up"].T.astype(np.float64), 0)
                    y[t] += out["gates"][t, j] * (h @ p[f"experts.{e}.w_down"].T.astype(np.float64))
        np.testing.assert_allclose(out["y"], y, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(out["expert_in"], x[out["row_token"]])

    def check_gradients(self, name, T=5, **overrides):
        cfg = moelab.preset(name, hidden_size=4, intermediate_size=4, **overrides)
        p = {k: v.astype(np.float64) for k, v in moelab.init_layer(cfg, seed=3, init_std=0.6).items()}
        rng = np.random.default_rng(8)
        x = rng.standard_normal((T, 4))
        dy = rng.standard_normal((T, 4))

        def loss():
            out = moelab.layer_forward(x, p, cfg, precision="float64")
            return float((dy * out["y"]).sum() + out["aux_loss"] + out["z_loss"])

        g = moelab.layer_backward(dy, x, p, cfg, precision="float64")
        trainable = [k for k in p if k != "selection_bias"]
        self.assertEqual(sorted(g), sorted(["dx"] + trainable))
        checked = 0
        for name_, arr in [("dx", x)] + [(k, p[k]) for k in trainable]:
            for index in list(np.ndindex(arr.shape))[::2]:
                num = central_difference(loss, arr, index, 1e-6)
                self.assertAlmostEqual(g[name_][index], num, delta=1e-6 * (1 + abs(num)), msg=f"{name} {name_} {index}")
                checked += 1
        self.assertGreater(checked, 50)

    def test_gradients_mixtral_with_z_loss(self):
        self.check_gradients("mixtral", num_experts=4, z_loss_coef=0.01)

    def test_gradients_deepseek_v3_shared_expert(self):
        self.check_gradients("deepseek_v3", shared_intermediate_size=4)

    def test_gradients_qwen2_moe_gated_shared_expert(self):
        self.check_gradients("qwen2_moe", num_experts=4, shared_intermediate_size=4)

    def test_gradients_gpt_oss_biases(self):
        self.check_gradients("gpt_oss", num_experts=4)

    def test_float32_matches_float64(self):
        cfg = moelab.preset("olmoe")
        p = moelab.init_layer(cfg, seed=5)
        x = np.random.default_rng(9).standard_normal((8, 16)).astype(np.float32)
        a = moelab.layer_forward(x, p, cfg)
        b = moelab.layer_forward(x, p, cfg, precision="float64")
        self.assertEqual((a["y"].dtype, b["y"].dtype), (np.float32, np.float64))
        np.testing.assert_array_equal(a["ids"], b["ids"])
        np.testing.assert_allclose(a["y"], b["y"], rtol=1e-4, atol=1e-7)

    def test_upcycled_layer_is_the_dense_ffn(self):
        cfg = moelab.preset("mixtral")  # top-2, gates softmax over the two: they sum to 1, dropless
        dense = moelab.init_expert(cfg, seed=6, init_std=0.2)
        p = moelab.upcycle(dense, cfg, seed=0)
        x = np.random.default_rng(10).standard_normal((6, 16))
        y = moelab.layer_forward(x, p, cfg, precision="float64")["y"]
        np.testing.assert_allclose(y, moelab.expert_forward(x, dense, cfg, precision="float64")["y"], rtol=1e-10)
        seg = moelab.segment_layer(cfg, 2)
        self.assertEqual((seg["routing"]["num_experts"], seg["routing"]["top_k"], seg["expert"]["intermediate_size"]),
                         (16, 4, 16))


class NoCopy(unittest.TestCase):
    def test_results_are_views_of_the_cpp_matrices(self):
        cfg = moelab.preset("mixtral")
        p = moelab.init_layer(cfg)
        out = moelab.layer_forward(np.ones((4, 16), np.float32), p, cfg)
        for key in ("y", "logits", "ids", "load", "expert_out"):
            a = out[key]
            self.assertFalse(a.flags.owndata, key)
            self.assertEqual(type(a.base).__name__, "PyCapsule", key)
            self.assertTrue(a.flags.writeable and a.flags.c_contiguous, key)
        self.assertFalse(np.shares_memory(out["logits"], out["scores"]))
        # The array keeps its C++ matrix alive after the dict is gone.
        y = out["y"]
        expected = y.copy()
        del out
        np.testing.assert_array_equal(y, expected)
        # Writing into a result changes nothing else: inputs are copied in, results are fresh.
        w = p["router.weight"]
        r1 = moelab.route(np.ones((2, 16)), w, cfg)
        r1["logits"][:] = 0
        w_before = w.copy()
        r2 = moelab.route(np.ones((2, 16)), w, cfg)
        self.assertTrue(np.abs(r2["logits"]).max() > 0)
        np.testing.assert_array_equal(w, w_before)

    def test_non_contiguous_inputs_are_read_correctly(self):
        cfg = moelab.preset("mixtral")
        p = moelab.init_layer(cfg, seed=2)
        big = np.random.default_rng(11).standard_normal((16, 10)).astype(np.float32)
        x = big.T  # (10, 16), Fortran order
        self.assertFalse(x.flags.c_contiguous)
        a = moelab.layer_forward(x, p, cfg)
        b = moelab.layer_forward(np.ascontiguousarray(x), p, cfg)
        np.testing.assert_array_equal(a["y"], b["y"])
        a = moelab.layer_forward(x[::2], p, cfg)  # strided rows
        np.testing.assert_array_equal(a["y"], moelab.layer_forward(np.ascontiguousarray(x[::2]), p, cfg)["y"])


if __name__ == "__main__":
    unittest.main()
