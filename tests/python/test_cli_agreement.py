"""The module and the `moelab` CLI of the same build give the same values: route, route --checkpoint, sdc
--trace, check, params, presets, and the same error messages. Exits 77 (ctest: skipped) when the CLI has not
been built (cmake --build BUILD --target moelab)."""
import math
import os
import sys
import tempfile
import unittest

import numpy as np

import moelab
from moelab_testing import CLI, GOLDEN_DIR, cli_error, cli_json, small_trainer


def cli_route_inputs(config, tokens, seed):
    """The batch `moelab route --preset P --tokens T --seed S` makes (tools/cmd_route.cpp make_batch)."""
    rng = moelab.Rng(seed)
    C, E = config["hidden_size"], config["num_experts"]
    x = rng.normal((tokens, C)).astype(np.float32)
    w = (1.0 / math.sqrt(C) * rng.normal((E, C))).astype(np.float32)
    bias = (0.1 * rng.normal(E)).astype(np.float32) if config["router"]["use_bias"] else None
    token_ids = [rng.next_u64() % 256 for _ in range(tokens)]
    return x, w, bias, token_ids


class Route(unittest.TestCase):
    def test_every_preset_as_the_cli_routes_it(self):
        for name in moelab.presets():
            for dtype in ("fp32", "bf16"):
                with self.subTest(preset=name, dtype=dtype):
                    doc = cli_json("route", "--preset", name, "--tokens", "8", "--seed", "3", "--dtype", dtype)
                    config = doc["config"]
                    x, w, bias, token_ids = cli_route_inputs(config, 8, 3)
                    self.assertEqual(token_ids, doc["token_ids"])
                    out = moelab.route(x, w, config, router_bias=bias, token_ids=token_ids)
                    np.testing.assert_array_equal(out["ids"], doc["ids"])
                    np.testing.assert_array_equal(out["gates"], np.float32(doc["gates"]))
                    np.testing.assert_array_equal(out["load"], doc["load"])
                    self.assertEqual(out["aux_loss"], doc["aux_loss"])
                    self.assertEqual(out["z_loss"], doc["z_loss"])

    def test_presets_and_params(self):
        doc = cli_json("presets")
        self.assertEqual([p["name"] for p in doc["presets"]], moelab.presets())
        for p in doc["presets"]:
            info = moelab.preset_info(p["name"])
            for key in ("model", "source", "convention", "full", "tiny"):
                self.assertEqual(info[key], p[key], (p["name"], key))
        for name in ("deepseek_v3", "mixtral", "qwen2_moe"):
            params = cli_json("params", "--preset", name)
            a = moelab.account(name)
            for key in ("total_params", "active_params", "active_params_with_embedding"):
                self.assertEqual(a[key], params[key], (name, key))

    def test_error_messages(self):
        with self.assertRaises(moelab.Error) as e:
            moelab.preset("nope")
        self.assertIn(str(e.exception), cli_error("route", "--preset", "nope"))


class Checkpoint(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        trainer = small_trainer(seed=2)
        trainer.train(2)
        cls.dir = os.path.join(tempfile.mkdtemp(), "ckpt")
        trainer.save(cls.dir)
        cls.model = moelab.load_checkpoint(cls.dir)

    def test_route_text(self):
        text = "int main(void)"
        doc = cli_json("route", "--checkpoint", self.dir, "--text", text)
        r = moelab.route_text(self.model, text)
        self.assertEqual(doc["moe_layers"], r["moe_layers"])
        self.assertEqual(doc["bytes"], r["bytes"].tolist())
        for j, block in enumerate(r["blocks"]):
            for t, token in enumerate(doc["tokens"]):
                layer = token["layers"][j]
                self.assertEqual(layer["layer"], block["layer"])
                self.assertEqual(layer["experts"], block["ids"][t].tolist())
                np.testing.assert_array_equal(np.float32(layer["gates"]), block["gates"][t])

    def test_sdc_trace(self):
        text = "hello, world"
        doc = cli_json("sdc", "--checkpoint", self.dir, "--trace", "--site", "router_logits", "--dtype", "bf16",
                       "--bit", "14", "--token", "3", "--col", "2", "--text", text)
        t = moelab.trace_fault(self.model, text, "router_logits", "bf16", 14, token=3, col=2)
        self.assertEqual(doc["refused"], t["refused"])
        for key in ("selections_changed", "own_selection_changed", "layer_rel_error", "logit_rel_error", "loss_delta"):
            self.assertEqual(float(doc["metrics"][key]), t["metrics"][key], key)
        for pos, token in enumerate(doc["tokens"]):
            for j, layer in enumerate(token["layers"]):
                self.assertEqual(layer["experts_before"], t["ids_before"][j][pos].tolist())
                self.assertEqual(layer["experts_after"], t["ids_after"][j][pos].tolist())


class Golden(unittest.TestCase):
    def test_check_rows(self):
        doc = cli_json("check", "--golden", GOLDEN_DIR, "--impl", "cpu", "--filter", "*.layer.*")
        rows = moelab.check_golden(GOLDEN_DIR, "cpu", "*.layer.*")
        self.assertEqual([r["name"] for r in rows], [c["case"] for c in doc["cases"]])
        for r, c in zip(rows, doc["cases"]):
            self.assertEqual(r["verdict"], c["verdict"], r["name"])
            self.assertEqual(r["worst"], float(c["worst"]), r["name"])
            self.assertEqual([k["verdict"] for k in r["checks"]], [k["verdict"] for k in c["checks"]])


if __name__ == "__main__":
    if not os.path.exists(CLI):
        print(f"skipped: {CLI} has not been built (cmake --build BUILD --target moelab)")
        sys.exit(77)
    unittest.main()
