#!/usr/bin/env python3
"""Throughput of a running OpenAI-compatible server (t1 serve, vLLM, SGLang) at several
numbers of concurrent clients, with the official openai client.

    pip install openai
    t1 serve --model CKPT --port 8000 --served-model-name bench &
    python benches/serve.py --url http://127.0.0.1:8000 --model bench --clients 1,4,16

Each client sends --requests completions one after another: a --prompt-token prompt of token
ids (random, fixed seed), --max-tokens new tokens at temperature 1. Prints one JSON line per
client count: requests, completion tokens, wall seconds, tokens/s and mean latency.
"""
import argparse
import concurrent.futures
import json
import random
import time

import openai


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=2, help="per client")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--vocab", type=int, default=2048, help="prompt ids are drawn below this")
    a = p.parse_args()
    client = openai.OpenAI(base_url=a.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    rng = random.Random(0)

    def one(prompt):
        start = time.perf_counter()
        r = client.completions.create(model=a.model, prompt=prompt, max_tokens=a.max_tokens, temperature=1.0)
        return r.usage.completion_tokens, time.perf_counter() - start

    one([1] * a.prompt_tokens)  # warm-up
    for clients in [int(c) for c in a.clients.split(",")]:
        prompts = [[rng.randrange(a.vocab) for _ in range(a.prompt_tokens)] for _ in range(clients * a.requests)]
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            done = list(pool.map(one, prompts))
        wall = time.perf_counter() - start
        tokens = sum(t for t, _ in done)
        print(json.dumps({"clients": clients, "requests": len(done), "completion_tokens": tokens, "wall_s": round(wall, 2),
                          "tokens_per_s": round(tokens / wall, 1), "mean_latency_s": round(sum(l for _, l in done) / len(done), 2)}), flush=True)


if __name__ == "__main__":
    main()
