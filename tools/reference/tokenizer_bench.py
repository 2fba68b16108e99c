#!/usr/bin/env python3
"""tiktoken's single-threaded encode and decode throughput on the corpus,
for bench/tokenizer.lua to print beside gptoss's own. Prints one JSON line.

    python3 tools/reference/tokenizer_bench.py TOKENIZER_JSON CORPUS_DIR [REPEATS]
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from tokenizer_ids import build_tiktoken  # noqa: E402


def main():
    tok_json, corpus = sys.argv[1:3]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    t0 = time.perf_counter()
    enc, _ = build_tiktoken(tok_json)
    load = time.perf_counter() - t0
    docs = []
    for name in sorted(os.listdir(corpus)):
        if name.endswith(".txt"):
            with open(os.path.join(corpus, name), "rb") as f:
                docs.append(f.read().decode("utf-8"))
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    ids = [enc.encode_ordinary(d) for d in docs]      # warm-up
    enc_times, dec_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d in docs:
            enc.encode_ordinary(d)
        enc_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in ids:
            enc.decode_bytes(i)
        dec_times.append(time.perf_counter() - t0)
    enc_times.sort()
    dec_times.sort()
    med = lambda v: v[len(v) // 2]
    print(json.dumps({
        "impl": "tiktoken " + __import__("tiktoken").__version__,
        "bytes": nbytes, "ids": sum(len(i) for i in ids),
        "encode_MBps": nbytes / med(enc_times) / 1e6, "decode_MBps": nbytes / med(dec_times) / 1e6,
        "load_s": load,
    }))


if __name__ == "__main__":
    main()
