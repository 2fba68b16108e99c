#!/usr/bin/env python3
"""Logits of a checkpoint that model:merge wrote with expert LoRAs (experts
in bf16, no quantization_config), as transformers' GptOssForCausalLM
computes them in float32: the oracle for spec/lora_gpu_spec.lua's merge
check, run on the GPU machine.

    python3 tools/reference/hf_merged_logits.py CHECKPOINT_DIR IDS_JSON OUT

Saves OUT (safetensors) with logits [T, V] F32 for the ids in IDS_JSON (a
JSON list of token ids).
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import GptOssForCausalLM


def main():
    path, ids_path, out = sys.argv[1:4]
    with open(ids_path) as f:
        ids = json.load(f)
    try:
        model = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32)
    except TypeError:
        model = GptOssForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    model.eval()
    # the merged experts are the bf16 parameters themselves, not dequantized MXFP4
    assert model.config.to_dict().get("quantization_config") is None
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().contiguous()
    save_file({"logits": logits}, out)


if __name__ == "__main__":
    main()
