#!/usr/bin/env python3
"""PyTorch reference for `t1 bench`: the same two numbers on the same checkpoint, on the CPU.

    pip install torch transformers safetensors      # CPU is enough
    python benches/reference.py make  --out /tmp/qwen2-20m          # a random ~20M Qwen2
    python benches/reference.py sft      --model /tmp/qwen2-20m --batch 8 --seq 256 --steps 5
    python benches/reference.py generate --model /tmp/qwen2-20m --batch 16 --prompt 32 --new 128

Each bench prints one JSON line like `t1 bench sft|generate` does:
- sft: tokens/s of forward + backward + AdamW on random tokens [batch, seq] (every position a
  loss token, next-token cross entropy), PyTorch eager, after one warm-up step;
- generate: newly sampled tokens/s of HF `generate` (KV cache, temperature 1, no top-k/top-p),
  every sequence generating exactly `new` tokens (EOS disabled), after a 4-token warm-up;
plus the peak resident memory of the process (ru_maxrss). `--dtype bfloat16` runs in bf16;
`--device cuda` runs on the GPU (timings synchronised, plus its peak allocated memory).
"""
import argparse
import json
import resource
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load(path, dtype, device="cpu"):
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_peak_mib(device):
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def make(args):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"made": args.out, "params": n}))


def sft(args):
    model = load(args.model, args.dtype, args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1), generator=g).to(args.device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        logits = model(input_ids=inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        times.append(time.perf_counter() - start)
    secs = sum(times[1:]) / max(1, len(times) - 1)
    tokens = args.batch * args.seq
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "bench": "sft", "impl": "pytorch-eager", "params": params, "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "dtype": args.dtype, "threads": torch.get_num_threads(), "step_s": secs,
        "tokens_per_s": tokens / secs, "gflop_per_s_6nd": 6 * params * tokens / secs / 1e9,
        "warmup_s": times[0], "peak_rss_mib": peak_rss_mib(), "device": args.device, "peak_gpu_mib": gpu_peak_mib(args.device),
    }))


def generate(args):
    model = load(args.model, args.dtype, args.device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=g).to(args.device)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        sync(args.device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, **kw)
        sync(args.device)
        secs = time.perf_counter() - start
    new = (out.shape[1] - args.prompt) * args.batch
    assert new == args.batch * args.new, (out.shape, args.new)
    print(json.dumps({
        "bench": "generate", "impl": "hf-generate", "params": sum(p.numel() for p in model.parameters()),
        "batch": args.batch, "prompt": args.prompt, "new": args.new, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "seconds": secs, "tokens_per_s": new / secs, "peak_rss_mib": peak_rss_mib(),
        "device": args.device, "peak_gpu_mib": gpu_peak_mib(args.device),
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a random Qwen2 checkpoint")
    m.add_argument("--out", required=True)
    m.add_argument("--vocab", type=int, default=2048)
    m.add_argument("--hidden", type=int, default=512)
    m.add_argument("--intermediate", type=int, default=1408)
    m.add_argument("--layers", type=int, default=6)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--kv-heads", type=int, default=2)
    s = sub.add_parser("sft")
    s.add_argument("--model", required=True)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seq", type=int, default=256)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    gen = sub.add_parser("generate")
    gen.add_argument("--model", required=True)
    gen.add_argument("--batch", type=int, default=16)
    gen.add_argument("--prompt", type=int, default=32)
    gen.add_argument("--new", type=int, default=128)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    {"make": make, "sft": sft, "generate": generate}[args.cmd](args)


if __name__ == "__main__":
    main()
