"""Solutions of lab 7 (scale)."""


def expert_params(hidden, intermediate, activation):
    matrices = 3 if activation == "swiglu" else 2    # gate, up, down; or up, down
    return matrices * hidden * intermediate


def total_and_active(s):
    expert = expert_params(s["hidden"], s["expert_intermediate"], "swiglu")
    dense_ffn = expert_params(s["hidden"], s["dense_intermediate"], "swiglu")
    moe_layers = s["layers"] - s["dense_layers"]
    embedding = s["vocab"] * s["hidden"]
    head = 0 if s["tied"] else s["vocab"] * s["hidden"]
    common = (s["layers"] * s["attention_per_layer"] + s["dense_layers"] * dense_ffn
              + moe_layers * (s["shared_experts"] * expert + s["router_per_layer"]) + s["norms"] + head)
    total = common + embedding + moe_layers * s["experts"] * expert
    active = common + moe_layers * s["top_k"] * expert + (embedding if s["tied"] else 0)
    return total, active
