"""The model, training, checkpoints, analysis, accounting and the SDC trace from Python (reference/model.h,
train.h, analysis.h, accounting.h, sdc.h). Training runs a few steps of tiny_moe on a small generated
corpus (seconds)."""
import os
import tempfile
import unittest

import numpy as np

import moelab
from moelab_testing import small_corpus, small_trainer


class Corpus(unittest.TestCase):
    def test_generated_corpus(self):
        c = moelab.read_corpus(small_corpus())
        self.assertTrue(c["fallback"])  # an empty root: generated domains only
        names = [d["name"] for d in c["domains"]]
        self.assertIn("arithmetic", names)
        for d in c["domains"]:
            self.assertLessEqual(sum(d["bytes"]), 8192)
            self.assertGreater(d["documents"][0], 0)
        with self.assertRaisesRegex(moelab.Error, "manifest.json"):
            moelab.read_corpus(tempfile.mkdtemp())


class Training(unittest.TestCase):
    def test_steps_are_deterministic_and_resume_bit_identically(self):
        a = small_trainer(seed=3)
        b = small_trainer(seed=3)
        ma = a.train(3)
        mb = b.train(3)
        self.assertEqual([m["loss"] for m in ma], [m["loss"] for m in mb])
        self.assertEqual([m["step"] for m in ma], [0, 1, 2])
        self.assertEqual(a.steps_done, 3)
        m = ma[-1]
        self.assertEqual(m["moe_layers"], [0, 1, 2, 3])
        self.assertEqual(m["load"].shape, (4, 8))
        self.assertEqual(int(m["load"][0].sum()), 4 * 32 * 2)  # B * T tokens, k = 2
        self.assertGreaterEqual(m["load_imbalance"], 1.0)
        ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
        a.save(ckpt)
        c = small_trainer(seed=3)
        c.load(ckpt)
        self.assertEqual(c.steps_done, 3)
        self.assertEqual(c.step()["loss"], a.step()["loss"])
        pa, pc = a.params(), c.params()
        for name in pa:
            np.testing.assert_array_equal(pa[name], pc[name], err_msg=name)

    def test_initial_parameters_are_init_model(self):
        t = small_trainer(seed=5)
        m = moelab.init_model("tiny_moe", seed=5)
        pt, pm = t.params(), m.params()
        self.assertEqual(sorted(pt), sorted(pm))
        for name in pt:
            np.testing.assert_array_equal(pt[name], pm[name], err_msg=name)
        self.assertEqual(pt["model.embed_tokens.weight"].shape, (256, t.model_config["hidden_size"]))
        self.assertIn("model.layers.0.mlp.gate.weight", pt)
        self.assertIn("model.layers.0.mlp.experts.7.down_proj.weight", pt)

    def test_evaluate_and_params_are_copies(self):
        t = small_trainer()
        ev = t.evaluate()
        D = len(t.domain_names)
        self.assertEqual(ev["domain_names"], t.domain_names)
        self.assertEqual(ev["domain_loss"].shape, (D,))
        self.assertEqual(len(ev["routing"]), 4)
        self.assertEqual(ev["routing"][0].shape, (D, 8))
        self.assertEqual(float(ev["routing"][0].sum()), ev["tokens"] * 2)  # every token's 2 pairs
        self.assertAlmostEqual(ev["loss"], np.log(256), delta=0.1)  # untrained: about uniform over bytes
        self.assertLess(t.unigram_baseline(), np.log(256))
        before = t.params()["lm_head.weight"].copy()
        t.step()
        self.assertFalse(np.array_equal(t.params()["lm_head.weight"], before))  # training moved on ...
        self.assertEqual(t.evaluate()["step"], 1)

    def test_recorder_gets_every_step_stamped(self):
        rec = moelab.Recorder(["topk_ids"])
        t = small_trainer(recorder=rec)
        t.train(2)
        events = rec.events("topk_ids")
        self.assertEqual(len(events), 2 * 2 * 4)  # steps x micro-batches x MoE blocks
        self.assertEqual(sorted({(e["step"], e["layer"]) for e in events}),
                         [(s, b) for s in (0, 1) for b in range(4)])
        self.assertEqual(events[0]["values"].shape, (2 * 32, 2))  # a micro-batch: B/M sequences of T bytes

    def test_read_events(self):
        path = os.path.join(tempfile.mkdtemp(), "events.jsonl")
        with open(path, "w") as f:
            f.write('{"name":"scores","layer":1,"step":7,"shape":[1,2],"values":[0.25,"inf"],"ids":[],'
                    '"stats":{"max":"inf"}}\n')
            f.write('{"name":"topk_ids","layer":-1,"step":-1,"shape":[1,2],"values":[],"ids":[3,1],"stats":{}}\n')
        a, b = moelab.read_events(path)
        self.assertEqual((a["name"], a["layer"], a["step"], a["shape"]), ("scores", 1, 7, (1, 2)))
        np.testing.assert_array_equal(a["values"], [[0.25, np.inf]])
        self.assertEqual(a["stats"], {"max": np.inf})
        self.assertEqual(b["values"].dtype, np.int32)
        np.testing.assert_array_equal(b["values"], [[3, 1]])
        with open(path, "a") as f:
            f.write("{not json\n")
        with self.assertRaisesRegex(moelab.Error, "line 3"):
            moelab.read_events(path)

    def test_overrides_and_bad_configs(self):
        t = moelab.Trainer(corpus_dir=small_corpus(), model="deepseek_v3", steps=2, batch_size=2, seq_len=16,
                           adamw={"lr": 1e-3})
        self.assertEqual(t.config["model_name"], "deepseek_v3")
        self.assertEqual(t.config["adamw"]["lr"], 1e-3)
        self.assertEqual(t.config["adamw"]["beta2"], 0.95)  # merged, not replaced
        with self.assertRaisesRegex(moelab.Error, "train.stepz"):
            moelab.Trainer(corpus_dir=small_corpus(), stepz=3)
        with self.assertRaisesRegex(moelab.Error, "batch_size"):
            moelab.Trainer(corpus_dir=small_corpus(), batch_size=0)


class RunningAModel(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.trainer = small_trainer(seed=1)
        cls.trainer.train(2)
        cls.model = cls.trainer.model()

    def test_forward_loss_is_the_cross_entropy_of_its_logits(self):
        f = moelab.forward(self.model, "int main(void) { return 0; }")
        ids = f["tokens"][0]
        logits = f["logits"].astype(np.float64)
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        ce = (lse[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]).mean()
        self.assertAlmostEqual(f["loss"], ce, places=5)
        self.assertEqual(len(f["blocks"]), 4)
        self.assertEqual(f["blocks"][0]["ids"].shape, (len(ids), 2))
        batch = moelab.forward(self.trainer, np.array([list(b"hello"), list(b"world")]))
        self.assertEqual(batch["tokens"].shape, (2, 5))
        # The same sequence alone gives the same logits (token-choice dropless routing is per token).
        alone = moelab.forward(self.trainer, b"world")
        np.testing.assert_allclose(batch["logits"][5:], alone["logits"], rtol=1e-5, atol=1e-6)

    def test_route_text(self):
        r = moelab.route_text(self.model, "abc")
        f = self.model.forward("abc")
        np.testing.assert_array_equal(r["bytes"], [97, 98, 99])
        self.assertEqual((r["selection"], r["top_k"], r["num_experts"], r["dtype"]), ("token_choice", 2, 8, "fp32"))
        for rb, fb in zip(r["blocks"], f["blocks"]):
            np.testing.assert_array_equal(rb["ids"], fb["ids"])
        bf16 = moelab.route_text(self.model, "abc", dtype="bf16")
        self.assertEqual(bf16["dtype"], "bf16")
        with self.assertRaisesRegex(moelab.Error, "tokens"):
            moelab.forward(self.model, "")

    def test_record_stamps_the_blocks(self):
        f = moelab.forward(self.model, "ab", record=True)
        layers = {e["layer"] for e in f["events"] if e["name"] == "topk_ids"}
        self.assertEqual(layers, {0, 1, 2, 3})

    def test_trace_fault(self):
        base = moelab.trace_fault(self.model, "hello world", "router_logits", "bf16", 14, flip=False)
        m = base["metrics"]
        self.assertEqual((m["selections_changed"], m["layer_rel_error"], m["logit_rel_error"], m["loss_delta"]),
                         (0.0, 0.0, 0.0, 0.0))
        t = moelab.trace_fault(self.model, "hello world", "router_logits", "bf16", 15, token=2, col=3)
        r = t["record"]
        self.assertTrue(r["applied"])
        self.assertEqual(r["stored"], moelab.round_to(r["value"], "bf16"))
        self.assertEqual(r["faulted"], -r["stored"])  # bit 15 of bf16 is the sign
        self.assertEqual(r["faulted_bits"], r["stored_bits"] ^ (1 << 15))
        self.assertEqual(t["fault"]["layer"], 0)
        self.assertEqual(len(t["ids_before"]), 4)
        np.testing.assert_array_equal(t["ids_before"][1], base["ids_before"][1])
        with self.assertRaisesRegex(moelab.Error, "col"):
            moelab.trace_fault(self.model, "hi", "router_logits", "bf16", 3, col=99)

    def test_checkpoint_round_trip(self):
        d = tempfile.mkdtemp()
        self.trainer.save(d)
        m = moelab.load_checkpoint(d)
        self.assertEqual(m.step, 2)
        self.assertEqual(m.path, d)
        self.assertEqual(m.config, self.trainer.config)
        np.testing.assert_array_equal(moelab.forward(m, "xyz")["logits"], moelab.forward(self.model, "xyz")["logits"])

    def test_analyze_model(self):
        reports = moelab.analyze_model(self.model, small_corpus(), batches=1, batch_size=4, seq_len=32,
                                       reference=self.model)
        self.assertEqual([r["layer"] for r in reports], [0, 1, 2, 3])
        r = reports[0]
        self.assertEqual((r["tokens"], r["top_k"], r["num_experts"]), (128, 2, 8))
        self.assertEqual(int(r["load"]["counts"].sum()), 256)
        self.assertEqual(r["saturation"]["mean"], 1.0)  # the same model routes the same way
        self.assertIn("Layer 0", r["summary"])


class Analysis(unittest.TestCase):
    def test_load_stats_hand_example(self):
        ids = np.array([[0, 1], [0, 2], [0, 3], [0, 1]])
        s = moelab.load_stats(ids, 4, gates=np.full((4, 2), 0.5))
        x = np.array([4, 2, 1, 1])
        np.testing.assert_array_equal(s["counts"], x)
        self.assertAlmostEqual(s["max_over_mean"], 2.0)
        self.assertAlmostEqual(s["cv"], x.std() / x.mean())
        self.assertAlmostEqual(s["jain"], x.sum() ** 2 / (4 * (x**2).sum()))
        p = x / x.sum()
        self.assertAlmostEqual(s["entropy"], float(-(p * np.log(p)).sum()))
        self.assertAlmostEqual(s["mean_gate_entropy"], np.log(2))
        self.assertIsNone(moelab.load_stats(ids, 4)["mean_gate_entropy"])

    def test_mutual_information_and_coactivation(self):
        ids = np.array([[0], [1], [0], [1]])
        mi = moelab.mutual_information(ids, 2, labels=[0, 1, 0, 1], num_labels=2)
        self.assertAlmostEqual(mi["nats"], np.log(2))
        self.assertAlmostEqual(mi["normalised"], 1.0)
        self.assertAlmostEqual(moelab.mutual_information(ids, 2, [0, 0, 1, 1], 2)["nats"], 0.0)
        c = moelab.coactivation(np.array([[0, 1], [0, 2], [0, 1]]), 3)
        np.testing.assert_array_equal(c["tokens"], [[3, 2, 1], [2, 2, 0], [1, 0, 1]])
        self.assertAlmostEqual(c["share"][0, 1], 2 / 3)
        self.assertEqual(c["share"][0, 0], 0.0)
        self.assertEqual((c["top_pairs"][0]["expert"], c["top_pairs"][0]["other"]), (1, 0))  # share 1
        np.testing.assert_array_equal(moelab.byte_class_labels(list(b"a1 .")), [0, 1, 2, 3])
        self.assertEqual(moelab.byte_class_names()[:4], ["letter", "digit", "whitespace", "punctuation"])
        sat = moelab.router_saturation(np.array([[0, 1], [2, 3]]), np.array([[1, 0], [2, 0]]), 4)
        self.assertAlmostEqual(sat["mean"], 0.75)
        self.assertAlmostEqual(sat["first_choice_agreement"], 0.5)

    def test_analyze_layer_and_errors(self):
        rng = np.random.default_rng(0)
        ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(200)])
        r = moelab.analyze_layer(ids, 8, bytes=rng.integers(0, 256, 200), domains=rng.integers(0, 3, 200),
                                 domain_names=["a", "b", "c"], permutations=5)
        self.assertEqual(r["domains"]["assignments"].shape, (3, 8))
        self.assertEqual(r["domain_mi_baseline"]["permutations"], 5)
        self.assertIsNone(r["saturation"])
        with self.assertRaisesRegex(moelab.Error, r"ids\(0, 1\) = 8"):
            moelab.load_stats(np.array([[0, 8]]), 8)


class Accounting(unittest.TestCase):
    def test_published_models(self):
        v3 = moelab.account("deepseek_v3")
        self.assertAlmostEqual(v3["total_params"] / 671e9, 1.0, delta=0.01)
        self.assertAlmostEqual(v3["active_params"] / 37e9, 1.0, delta=0.03)
        mixtral = moelab.account("mixtral")
        self.assertAlmostEqual(mixtral["total_params"] / 46.7e9, 1.0, delta=0.01)
        parts = ("embedding", "lm_head", "attention", "dense_ffn", "routed_experts", "shared_experts", "routers", "norms")
        self.assertEqual(sum(mixtral[p]["total"] for p in parts), mixtral["total_params"])
        self.assertEqual(mixtral["bytes_bf16"], 2 * mixtral["total_params"])
        sizes = moelab.model_sizes("mixtral")
        self.assertEqual((sizes["n_routed_experts"], sizes["top_k"]), (8, 2))
        with self.assertRaisesRegex(moelab.Error, "gshard"):
            moelab.model_sizes("gshard")

    def test_tiny_model_counts_its_parameters(self):
        cfg = moelab.model_config("tiny_moe")
        total = sum(a.size for a in moelab.init_model(cfg).params().values())
        self.assertEqual(moelab.account(cfg)["total_params"], total)


if __name__ == "__main__":
    unittest.main()
