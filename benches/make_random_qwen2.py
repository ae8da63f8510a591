#!/usr/bin/env python3
"""A random-weight Qwen2 checkpoint (HF layout, tied embeddings, f32) with numpy only.

    pip install numpy safetensors
    python benches/make_random_qwen2.py --out /tmp/qwen2-50m --layers 8 --hidden 768 --heads 12 --kv-heads 2 --intermediate 2048

For `t1 bench` at sizes where installing torch (benches/reference.py make) is not worth it:
the weights are N(0, 0.02), norms 1, biases 0, like transformers' init; `t1 bench` only needs
the shapes.
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=2048)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    d = a.hidden // a.heads
    normal = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    t = {"model.embed_tokens.weight": normal(a.vocab, a.hidden), "model.norm.weight": np.ones(a.hidden, np.float32)}
    for i in range(a.layers):
        l = f"model.layers.{i}."
        t[l + "self_attn.q_proj.weight"] = normal(a.heads * d, a.hidden)
        t[l + "self_attn.q_proj.bias"] = np.zeros(a.heads * d, np.float32)
        for kv in ("k", "v"):
            t[l + f"self_attn.{kv}_proj.weight"] = normal(a.kv_heads * d, a.hidden)
            t[l + f"self_attn.{kv}_proj.bias"] = np.zeros(a.kv_heads * d, np.float32)
        t[l + "self_attn.o_proj.weight"] = normal(a.hidden, a.heads * d)
        t[l + "mlp.gate_proj.weight"] = normal(a.intermediate, a.hidden)
        t[l + "mlp.up_proj.weight"] = normal(a.intermediate, a.hidden)
        t[l + "mlp.down_proj.weight"] = normal(a.hidden, a.intermediate)
        t[l + "input_layernorm.weight"] = np.ones(a.hidden, np.float32)
        t[l + "post_attention_layernorm.weight"] = np.ones(a.hidden, np.float32)
    os.makedirs(a.out, exist_ok=True)
    save_file(t, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": a.vocab, "hidden_size": a.hidden, "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(json.dumps({"made": a.out, "params": int(sum(v.size for v in t.values()))}))


if __name__ == "__main__":
    main()
