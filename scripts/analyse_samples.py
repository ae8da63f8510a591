#!/usr/bin/env python3
"""Where the laptop task's answers go wrong: reads the samples.jsonl that `t1 eval` writes
(one graded response per line, with its model) and counts, per model, how the T1-shaped
solutions end.

    python3 scripts/analyse_samples.py out/demo/greedy/samples.jsonl [--json]

Each response is split into its attempts (`Attempt:` / `Retry:` lines, the value after the
last `= `) and the check after each (`Check: every step is right.` accepts, anything else
flags). A wrong final answer is put in the first class that applies:
- forced: the budget ran out and the answer was forced;
- malformed: no attempt could be read, or no `\\boxed{}`;
- accepted a wrong attempt: a check passed an attempt whose value is wrong;
- rejected a right attempt: a check flagged an attempt whose value is right;
- every retry wrong: each attempt was wrong and flagged, and the attempts ran out;
- boxed differs: the boxed answer is not the last attempt's value.
"""
import argparse
import collections
import json
import re
import sys

CLASSES = ["forced", "malformed", "accepted a wrong attempt", "rejected a right attempt", "every retry wrong", "boxed differs", "other"]


def attempts(text):
    """[(value or None, accepted or None)] for each Attempt/Retry line, in order."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("Attempt:") or line.startswith("Retry:"):
            m = re.search(r"= (-?\d+)\.?\s*$", line)
            value = m.group(1) if m else None
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            accepted = None
            if nxt.startswith("Check:"):
                accepted = nxt.strip() == "Check: every step is right."
            out.append((value, accepted))
    return out


def classify(r):
    if r["correct"]:
        return "correct"
    if r["forced"]:
        return "forced"
    att = attempts(r["response"])
    if not att or r.get("extracted") is None:
        return "malformed"
    ans = r["answer"]
    if any(v != ans and acc is True for v, acc in att):
        return "accepted a wrong attempt"
    if any(v == ans and acc is False for v, acc in att):
        return "rejected a right attempt"
    if all(v != ans for v, _ in att):
        return "every retry wrong"
    if att[-1][0] != r.get("extracted"):
        return "boxed differs"
    return "other"


def summarise(rows):
    n = len(rows)
    kinds = collections.Counter(classify(r) for r in rows)
    att = [len(attempts(r["response"])) for r in rows]
    first_right = sum(1 for r in rows if (a := attempts(r["response"])) and a[0][0] == r["answer"])
    checks = [(v == r["answer"], acc) for r in rows for v, acc in attempts(r["response"]) if acc is not None]
    wrong_checked = [acc for right, acc in checks if not right]
    right_checked = [acc for right, acc in checks if right]
    return {
        "responses": n,
        "accuracy": kinds["correct"] / max(n, 1),
        "mean_tokens": sum(r["tokens"] for r in rows) / max(n, 1),
        "mean_attempts": sum(att) / max(n, 1),
        "attempts_histogram": dict(sorted(collections.Counter(att).items())),
        "first_attempt_right": first_right / max(n, 1),
        # how well the model's checks work: wrong attempts caught, right attempts passed
        "wrong_attempts_caught": (sum(1 for a in wrong_checked if a is False) / len(wrong_checked)) if wrong_checked else None,
        "right_attempts_passed": (sum(1 for a in right_checked if a is True) / len(right_checked)) if right_checked else None,
        "wrong_answers": {k: kinds[k] for k in CLASSES if kinds[k]},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", nargs="+", help="samples.jsonl files written by t1 eval")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    by_model = collections.defaultdict(list)
    for path in args.samples:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{i}: not JSON ({e})")
                by_model[r.get("model", path)].append(r)
    out = {m: summarise(rows) for m, rows in by_model.items()}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for m, s in out.items():
        print(f"{m}: {s['responses']} responses, accuracy {s['accuracy']:.3f}, {s['mean_tokens']:.1f} tokens, {s['mean_attempts']:.2f} attempts {s['attempts_histogram']}")
        fmt = lambda x: "-" if x is None else f"{x:.3f}"
        print(f"  first attempt right {s['first_attempt_right']:.3f}; checks: wrong attempts caught {fmt(s['wrong_attempts_caught'])}, right attempts passed {fmt(s['right_attempts_passed'])}")
        print(f"  wrong answers: {s['wrong_answers']}")


if __name__ == "__main__":
    main()
