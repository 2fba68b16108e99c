#!/usr/bin/env python3
"""Hugging Face transformers on the same checkpoint as bench/llm.lua, in the
same run, and the device-to-device copy bandwidth that sets the floor.

    python3 tools/reference/hf_bench.py CHECKPOINT_DIR OUT_JSON

Prints and writes: copy bandwidth (bytes read + written per second), and
transformers' prefill (512 and 2048 tokens), batch-1 greedy decode (128
tokens after a 512-token prompt) and peak memory, bf16 with MXFP4 experts
dequantized (Mxfp4Config(dequantize=True)), eager attention.
"""
import json
import sys
import time

import torch


def copy_bandwidth():
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    t = times[len(times) // 2]
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / t


def main():
    path, out = sys.argv[1:3]
    res = {"copy_bytes_per_s": copy_bandwidth()}
    from transformers import GptOssForCausalLM, Mxfp4Config
    import transformers
    res["transformers"] = transformers.__version__
    t0 = time.perf_counter()
    kw = dict(quantization_config=Mxfp4Config(dequantize=True), attn_implementation="eager", device_map="cuda")
    try:
        model = GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw)
    except TypeError:
        model = GptOssForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, **kw)
    model.eval()
    res["load_s"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(1000, 151000, (1, n), generator=g).cuda()

    with torch.no_grad():
        model(prompt(64))
        for n in (512, 2048):
            x = prompt(n)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            res["prefill_%d_tok_s" % n] = n / (time.perf_counter() - t0)
        x = prompt(512)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out_ids = model.generate(x, max_new_tokens=1, do_sample=False, min_new_tokens=1)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_ids = model.generate(x, max_new_tokens=129, min_new_tokens=129, do_sample=False)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        res["ttft_512_ms"] = ttft * 1e3
        res["decode_tok_s"] = 128 / (total - ttft)
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(res))
    json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
