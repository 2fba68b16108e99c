#!/usr/bin/env python3
"""transformers + peft LoRA training on the checkpoint bench/train.lua uses,
for the side-by-side numbers of bench/RESULTS.md.

    python3 tools/reference/hf_train_bench.py CHECKPOINT_DIR OUT_JSON [SEQ] [STEPS]

bf16, MXFP4 experts dequantized (Mxfp4Config(dequantize=True): transformers
cannot train through MXFP4 kernels), eager attention, gradient checkpointing.
LoRA r=16, alpha=32 on q/k/v/o_proj and, through target_parameters, every
expert's gate_up_proj and down_proj. Batch 1; one AdamW step per sequence
after one warm-up step; tokens/s over STEPS steps and peak memory
(torch.cuda.max_memory_allocated, and reserved, the allocator's total).
"""
import json
import sys
import time

import torch


def main():
    path, out = sys.argv[1:3]
    seq = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    from transformers import GptOssForCausalLM, Mxfp4Config
    from peft import LoraConfig, get_peft_model
    import peft
    import transformers
    res = {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__, "seq": seq,
           "steps": steps}
    kw = dict(quantization_config=Mxfp4Config(dequantize=True), attn_implementation="eager", device_map="cuda")
    t0 = time.perf_counter()
    try:
        model = GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw)
    except TypeError:
        model = GptOssForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, **kw)
    res["load_s"] = time.perf_counter() - t0
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    res["params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(42)
    ids = torch.randint(1000, 151000, (1, seq), generator=g).cuda()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    torch.cuda.reset_peak_memory_stats()
    res["first_loss"] = step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        res["last_loss"] = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res["step_s"] = dt / steps
    res["tokens_per_s"] = seq * steps / dt
    res["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    res["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    print(json.dumps(res, indent=1))
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
