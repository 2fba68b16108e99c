#!/usr/bin/env python3
"""Reference outputs of Hugging Face transformers' GptOssForCausalLM, in
float32, on a checkpoint written by tools/make_checkpoint.lua.

Saves OUT (safetensors) with:
  prompt_ids [T] I32          the prompt, a harmony conversation (>= 48 tokens)
  greedy_ids [32] I32         greedy continuation, a full forward per step (no cache)
  final_hidden [T, H] F32     output of model.norm (what lm_head multiplies)
  layer_out_<l> [T, H] F32    residual stream after decoder layer l
  subset_ids [K] I32          vocabulary ids sampled once (seed 0) plus each row's argmax
  logits_subset [T, K] F32    logits at those ids
  logits_norm [T] F64         L2 norm of each full logits row
  argmax [T] I32              argmax of each full logits row
  router_top [L, T, k] I32    experts chosen per layer and token (from the router's input)
  router_w [L, T, k] F32      their routing weights (softmax over the top k)
and OUT.json with versions and the loading path used.

    python3 tools/reference/transformers_logits.py CHECKPOINT_DIR TOKENIZER_JSON OUT
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from tokenizer_ids import build_tiktoken  # noqa: E402

PROMPT = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
          "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: medium\n\n"
          "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
          "<|start|>user<|message|>Explain in two sentences why the sky is blue, and mention Rayleigh scattering.<|end|>"
          "<|start|>assistant")

FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def dequant(blocks, scales):
    """MXFP4 [E, R, G, 16] + [E, R, G] -> [E, R, G*32] (rows = out features)."""
    lut = torch.tensor(FP4, dtype=torch.float32)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    vals = torch.stack([lo, hi], dim=-1).reshape(*blocks.shape[:-1], 32)
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return vals.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def load_manual(path):
    """Builds the model from config and loads weights dequantized here."""
    from transformers import AutoConfig, GptOssForCausalLM
    cfg = AutoConfig.from_pretrained(path)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = GptOssForCausalLM(cfg).to(torch.float32)
    sd = {}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    raw = {}
    for f in files:
        with safe_open(os.path.join(path, f), "pt") as h:
            for k in h.keys():
                raw[k] = h.get_tensor(k)
    for k, v in raw.items():
        if k.endswith("_blocks"):
            base = k[: -len("_blocks")]
            w = dequant(v, raw[base + "_scales"])          # [E, out, in]
            sd[base] = w.transpose(1, 2).contiguous()        # HF keeps [E, in, out]
        elif k.endswith("_scales"):
            continue
        else:
            sd[k] = v.to(torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError("state dict mismatch: missing %s unexpected %s" % (missing[:5], unexpected[:5]))
    return model


def load_hf(path):
    from transformers import GptOssForCausalLM, Mxfp4Config
    kw = dict(quantization_config=Mxfp4Config(dequantize=True), attn_implementation="eager")
    try:
        return GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    except TypeError:
        return GptOssForCausalLM.from_pretrained(path, torch_dtype=torch.float32, **kw)


def main():
    path, tok_json, out = sys.argv[1:4]
    import transformers
    info = {"transformers": transformers.__version__, "torch": torch.__version__}
    manual = load_manual(path).eval()
    try:
        model = load_hf(path).eval().to(torch.float32)
        info["loader"] = "from_pretrained(Mxfp4Config(dequantize=True))"
        # the two loading paths must agree on every parameter
        ps = dict(manual.named_parameters())
        worst = 0.0
        for k, v in model.named_parameters():
            worst = max(worst, (v.detach().float() - ps[k].detach().float()).abs().max().item())
        info["max_param_difference_hf_vs_manual"] = worst
    except Exception as e:  # keep going with the manual loader, and say so
        info["loader"] = "manual dequantization (from_pretrained failed: %s)" % (str(e)[:300],)
        model = manual
    model.config._attn_implementation = "eager"
    enc, _ = build_tiktoken(tok_json)
    ids = enc.encode(PROMPT, allowed_special="all")
    assert len(ids) >= 48, len(ids)
    T = len(ids)
    cfg = model.config
    L, k = cfg.num_hidden_layers, cfg.num_experts_per_tok

    captured = {}
    hooks = [model.model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("final", o.detach()))]
    for li, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, li=li: captured.__setitem__("layer%d" % li, (o[0] if isinstance(o, tuple) else o).detach())))
        hooks.append(layer.mlp.router.register_forward_hook(
            lambda m, i, o, li=li: captured.__setitem__("router_in%d" % li, i[0].detach())))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    for h in hooks:
        h.remove()

    V = logits.shape[-1]
    g = torch.Generator().manual_seed(0)
    subset = torch.randperm(V, generator=g)[:4096]
    subset = torch.unique(torch.cat([subset, logits.argmax(-1)])).sort().values
    tensors = {
        "prompt_ids": torch.tensor(ids, dtype=torch.int32),
        "final_hidden": captured["final"].reshape(T, -1).contiguous(),
        "subset_ids": subset.to(torch.int32),
        "logits_subset": logits[:, subset].contiguous(),
        "logits_norm": logits.double().norm(dim=-1).contiguous(),
        "argmax": logits.argmax(-1).to(torch.int32),
    }
    tops, ws = [], []
    for li in range(L):
        tensors["layer_out_%d" % li] = captured["layer%d" % li].reshape(T, -1).contiguous()
        x = captured["router_in%d" % li].reshape(T, -1).double()
        r = model.model.layers[li].mlp.router
        rl = F.linear(x, r.weight.double(), r.bias.double())
        val, idx = torch.topk(rl, k, dim=-1, sorted=True)
        tops.append(idx.to(torch.int32))
        ws.append(torch.softmax(val, dim=-1).float())
    tensors["router_top"] = torch.stack(tops).contiguous()
    tensors["router_w"] = torch.stack(ws).contiguous()

    # greedy continuation: a full forward per step, no KV cache involved
    seq = list(ids)
    with torch.no_grad():
        for _ in range(32):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
    tensors["greedy_ids"] = torch.tensor(seq[T:], dtype=torch.int32)
    save_file(tensors, out)
    info.update({"tokens": T, "vocab": V, "prompt": PROMPT, "greedy": seq[T:]})
    with open(out + ".json", "w") as f:
        json.dump(info, f, indent=1)
    print("transformers_logits:", json.dumps({k: v for k, v in info.items() if k != "prompt"}))


if __name__ == "__main__":
    main()
