"""Routing from Python (reference/routing.h and its stages), against numpy and finite differences."""
import unittest

import numpy as np

import moelab
from moelab_testing import central_difference, softmax


def inputs(T=12, C=16, E=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, C)).astype(np.float32), (rng.standard_normal((E, C)) / 4).astype(np.float32)


class RouteAgainstNumpy(unittest.TestCase):
    def test_qwen2_moe_softmax_topk_selected_scores(self):
        cfg = moelab.preset("qwen2_moe")
        r = cfg["routing"]
        self.assertEqual((r["scoring"], r["selection"], r["gating"]["kind"]), ("softmax", "topk", "selected_scores"))
        x, w = inputs(E=r["num_experts"])
        out = moelab.route(x, w, cfg)
        logits = x.astype(np.float64) @ w.T.astype(np.float64)
        np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-6)
        p = softmax(logits)
        np.testing.assert_allclose(out["scores"], p, rtol=1e-5, atol=1e-7)
        k = r["top_k"]
        ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(out["ids"], ids)
        gates = np.take_along_axis(p, ids, 1)
        if r["gating"]["renormalize"]:
            gates = gates / gates.sum(1, keepdims=True)
        np.testing.assert_allclose(out["gates"], gates * r["gating"]["routed_scaling_factor"], rtol=1e-5)
        np.testing.assert_array_equal(out["load"], np.bincount(ids.ravel(), minlength=r["num_experts"]))
        self.assertEqual((out["ids"].dtype, out["load"].dtype, out["gates"].dtype), (np.int32, np.int64, np.float32))

    def test_mixtral_softmax_of_selected_logits_and_hf_aux_loss(self):
        cfg = moelab.preset("mixtral")
        x, w = inputs(E=cfg["routing"]["num_experts"], seed=1)
        out = moelab.route(x, w, cfg, precision="float64")
        logits = x.astype(np.float64) @ w.T.astype(np.float64)
        ids = np.argsort(-logits, axis=1, kind="stable")[:, :2]
        np.testing.assert_array_equal(out["ids"], ids)
        np.testing.assert_allclose(out["gates"], softmax(np.take_along_axis(logits, ids, 1)), rtol=1e-12)
        # Hugging Face load_balancing_loss_func: alpha * E * sum_e f_e P_e, f summed over the k slots.
        E, alpha = 8, cfg["routing"]["losses"]["aux_loss_coef"]
        f = np.bincount(ids.ravel(), minlength=E) / len(x)
        P = softmax(logits).mean(0)
        self.assertAlmostEqual(out["aux_loss"], alpha * E * float(f @ P), places=12)
        self.assertEqual(out["logits"].dtype, np.float64)

    def test_deepseek_v3_sigmoid_group_limited_with_bias(self):
        cfg = moelab.preset("deepseek_v3")
        r = cfg["routing"]
        E = r["num_experts"]
        x, w = inputs(E=E, seed=2)
        bias = np.linspace(-0.05, 0.05, E).astype(np.float32)
        out = moelab.route(x, w, cfg, selection_bias=bias)
        s = 1 / (1 + np.exp(-(x.astype(np.float64) @ w.T)))
        np.testing.assert_allclose(out["scores"], s, rtol=1e-5)
        ids = moelab.group_limited_topk(out["scores"], r["top_k"], r["group"]["n_group"], r["group"]["topk_group"],
                                        r["group"]["score"], r["group"]["mask"], selection_bias=bias)
        np.testing.assert_array_equal(out["ids"], ids)
        # Gates read the unbiased scores, renormalised, times the routed scaling factor.
        g = np.take_along_axis(s, ids, 1)
        g = g / (g.sum(1, keepdims=True) + r["gating"]["renorm_eps"]) * r["gating"]["routed_scaling_factor"]
        np.testing.assert_allclose(out["gates"], g, rtol=1e-5)

    def test_expert_choice_ids_are_tokens(self):
        cfg = moelab.preset("expert_choice")
        E = cfg["routing"]["num_experts"]
        x, w = inputs(T=16, E=E, seed=3)
        out = moelab.route(x, w, cfg)
        C = moelab.expert_choice_capacity(16, E, cfg["routing"]["capacity_factor"])
        self.assertEqual(out["ids"].shape, (E, C))
        np.testing.assert_array_equal(out["ids"], np.argsort(-out["scores"].T, axis=1, kind="stable")[:, :C])

    def test_hash_routing_uses_token_ids(self):
        cfg = moelab.preset("hash")
        E = cfg["routing"]["num_experts"]
        x, w = inputs(E=E)
        tokens = np.arange(12) * 7
        out = moelab.route(x, w, cfg, token_ids=tokens)
        np.testing.assert_array_equal(out["ids"][:, 0],
                                      [moelab.hash64(t ^ cfg["routing"]["hash_seed"]) % E for t in tokens])
        np.testing.assert_array_equal(out["gates"], 1.0)

    def test_record_and_recorder(self):
        cfg = moelab.preset("mixtral")
        x, w = inputs()
        rec = moelab.Recorder(["topk_ids"])
        out = moelab.route(x, w, cfg, record=True, recorder=rec)
        names = [e["name"] for e in out["events"]]
        self.assertEqual(names[:3], ["router_logits", "scores", "topk_ids"])
        ev = out["events"][0]
        self.assertEqual(ev["shape"], (12, 8))
        np.testing.assert_allclose(ev["values"], out["logits"], rtol=0, atol=0)  # float32 widened exactly
        self.assertAlmostEqual(ev["stats"]["max"], float(out["logits"].max()))
        self.assertEqual(len(rec), 1)  # only the names asked for
        ids_event = rec.last("topk_ids")
        self.assertEqual(ids_event["values"].dtype, np.int32)
        np.testing.assert_array_equal(ids_event["values"], out["ids"])
        moelab.route(x, w, cfg, recorder=rec)
        self.assertEqual(rec.count("topk_ids"), 2)
        rec.clear()
        self.assertEqual(len(rec), 0)

    def test_train_switches_noise_on(self):
        cfg = moelab.preset("switch")  # input jitter while training
        x, w = inputs(E=cfg["routing"]["num_experts"])
        evals = moelab.route(x, w, cfg)
        np.testing.assert_allclose(evals["logits"], x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-6)
        a = moelab.route(x, w, cfg, train=True, seed=1)
        b = moelab.route(x, w, cfg, train=True, seed=1)
        c = moelab.route(x, w, cfg, train=True, seed=2)
        np.testing.assert_array_equal(a["logits"], b["logits"])  # the same seed, the same bits
        self.assertFalse(np.array_equal(a["logits"], c["logits"]))
        self.assertFalse(np.array_equal(a["logits"], evals["logits"]))


class Backward(unittest.TestCase):
    def check_route_gradients(self, name, **overrides):
        cfg = moelab.preset(name, hidden_size=6, **overrides)
        E = cfg["routing"]["num_experts"]
        rng = np.random.default_rng(4)
        x = rng.standard_normal((5, 6))
        w = rng.standard_normal((E, 6)) * 0.7
        kwargs = {}
        if cfg["routing"]["use_selection_bias"]:
            kwargs["selection_bias"] = np.zeros(E)
        if cfg["routing"]["router"]["use_bias"]:
            kwargs["router_bias"] = rng.standard_normal(E) * 0.1
        dg = rng.standard_normal(moelab.route(x, w, cfg, precision="float64", **kwargs)["gates"].shape)

        def loss():
            out = moelab.route(x, w, cfg, precision="float64", **kwargs)
            return float((dg * out["gates"]).sum() + out["aux_loss"] + out["z_loss"])

        g = moelab.route_backward(dg, x, w, cfg, precision="float64", **kwargs)
        for arr, grad in [(x, g["dx"]), (w, g["router.weight"])]:
            for index in np.ndindex(arr.shape):
                num = central_difference(loss, arr, index, 1e-6)
                self.assertAlmostEqual(grad[index], num, delta=1e-6 * (1 + abs(num)), msg=f"{name} {index}")

    def test_mixtral(self):
        self.check_route_gradients("mixtral", z_loss_coef=0.01)

    def test_deepseek_v3(self):
        self.check_route_gradients("deepseek_v3")

    def test_gpt_oss_router_bias(self):
        self.check_route_gradients("gpt_oss")


class Stages(unittest.TestCase):
    def test_scores_and_backward(self):
        z = np.random.default_rng(5).standard_normal((4, 6))
        np.testing.assert_allclose(moelab.score(z, "softmax", precision="float64"), softmax(z), rtol=1e-14)
        np.testing.assert_allclose(moelab.score(z, "sigmoid", precision="float64"), 1 / (1 + np.exp(-z)), rtol=1e-14)
        np.testing.assert_allclose(moelab.score(z, "sqrt_softplus", precision="float64"),
                                   np.sqrt(np.log1p(np.exp(z))), rtol=1e-14)
        d = np.random.default_rng(6).standard_normal((4, 6))
        for scoring in ("softmax", "sigmoid", "sqrt_softplus"):
            g = moelab.score_backward(d, z, scoring, precision="float64")
            f = lambda: float((moelab.score(z, scoring, precision="float64") * d).sum())  # noqa: E731
            for index in [(0, 0), (2, 3), (3, 5)]:
                self.assertAlmostEqual(g[index], central_difference(f, z, index, 1e-6), delta=1e-8)

    def test_topk_ties_to_lower_id_and_bias(self):
        s = np.array([[0.1, 0.3, 0.3, 0.2]])
        np.testing.assert_array_equal(moelab.topk(s, 2), [[1, 2]])
        np.testing.assert_array_equal(moelab.topk(s, 2, selection_bias=[0.5, 0, 0, 0]), [[0, 1]])

    def test_group_limited_hand_example(self):
        # 8 experts in 4 groups of 2; top2_sum group scores: 0.9+0.8, 0.1+0.1, 0.7+0.6, 0.5+0.05.
        s = np.array([[0.9, 0.8, 0.1, 0.1, 0.7, 0.6, 0.5, 0.05]])
        ids = moelab.group_limited_topk(s, 2, n_group=4, topk_group=2)
        np.testing.assert_array_equal(ids, [[0, 1]])
        ids = moelab.group_limited_topk(s, 3, n_group=4, topk_group=2)
        np.testing.assert_array_equal(ids, [[0, 1, 4]])  # 6 (0.5) is in a group that was not kept

    def test_gates_and_backward(self):
        rng = np.random.default_rng(7)
        logits = rng.standard_normal((5, 6))
        scores = softmax(logits)
        ids = moelab.topk(scores, 2, precision="float64")
        g = moelab.gate_weights(logits, scores, ids, "selected_scores", renormalize=True, routed_scaling_factor=2.5,
                                precision="float64")
        sel = np.take_along_axis(scores, ids, 1)
        np.testing.assert_allclose(g, 2.5 * sel / sel.sum(1, keepdims=True), rtol=1e-14)
        dg = rng.standard_normal(g.shape)
        b = moelab.gate_weights_backward(dg, logits, scores, ids, "selected_scores", renormalize=True,
                                         routed_scaling_factor=2.5, precision="float64")
        f = lambda: float((dg * moelab.gate_weights(logits, scores, ids, "selected_scores", renormalize=True,  # noqa
                                                     routed_scaling_factor=2.5, precision="float64")).sum())
        for index in [(0, int(ids[0, 0])), (3, int(ids[3, 1]))]:
            self.assertAlmostEqual(b["dscores"][index], central_difference(f, scores, index, 1e-6), delta=1e-8)
        self.assertEqual(float(np.abs(b["dlogits"]).max()), 0.0)  # selected_scores: the gradient goes to scores


class Losses(unittest.TestCase):
    def test_switch_and_z_loss_against_numpy(self):
        rng = np.random.default_rng(8)
        logits = rng.standard_normal((10, 4))
        p = softmax(logits)
        ids = np.argsort(-p, 1, kind="stable")[:, :1]
        f = np.bincount(ids.ravel(), minlength=4) / 10
        self.assertAlmostEqual(moelab.aux_loss("switch", p, ids, 0.01, precision="float64"),
                               0.01 * 4 * float(f @ p.mean(0)), places=14)
        lse = np.log(np.exp(logits).sum(1))
        self.assertAlmostEqual(moelab.z_loss(logits, 0.001, precision="float64"), 0.001 * float((lse**2).mean()),
                               places=14)
        g = moelab.z_loss_backward(logits, 0.001, precision="float64")
        np.testing.assert_allclose(g, 0.001 * 2 * lse[:, None] * p / 10, rtol=1e-12)

    def test_every_kind_backward_against_finite_differences(self):
        rng = np.random.default_rng(9)
        T, E, k = 8, 4, 2
        logits = rng.standard_normal((T, E))
        probs = softmax(logits)
        sig = 1 / (1 + np.exp(-logits))
        ids = np.argsort(-probs, 1, kind="stable")[:, :k]
        cases = [("switch", probs, {}), ("hf", logits, {}), ("megablocks", probs, {"num_layers": 2}),
                 ("deepseek_v2_expert", probs, {}), ("deepseek_v2_device", probs, {"num_devices": 2}),
                 ("deepseek_v2_comm", probs, {"num_devices": 2, "devices_per_token": 2}),
                 ("deepseek_v3_sequence", sig, {"sequence_lengths": [3, 5]})]
        for kind, x, sizes in cases:
            x = x.copy()
            g = moelab.aux_loss_backward(kind, x, ids, 0.1, precision="float64", **sizes)
            f = lambda: moelab.aux_loss(kind, x, ids, 0.1, precision="float64", **sizes)  # noqa: E731
            for index in [(0, 0), (3, 2), (7, 3)]:
                self.assertAlmostEqual(g[index], central_difference(f, x, index, 1e-6), delta=1e-8, msg=kind)
        with self.assertRaisesRegex(moelab.Error, "kind"):
            moelab.aux_loss("nope", probs, ids, 0.1)

    def test_bias_update(self):
        bias = np.zeros(4, np.float32)
        load = np.array([5, 1, 2, 0])  # mean 2
        new = moelab.bias_update(bias, load, 0.001)
        np.testing.assert_array_equal(new, np.float32([-0.001, 0.001, 0.0, 0.001]))
        np.testing.assert_array_equal(bias, 0.0)  # not modified


if __name__ == "__main__":
    unittest.main()
