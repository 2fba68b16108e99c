#!/usr/bin/env python3
"""An adapter PEFT writes on Unsloth's module layout of gpt-oss's experts,
and the logits PEFT + transformers compute with it, in float32: the oracle
of spec/unsloth_spec.lua's fixture case (issue 24).

Unsloth's gpt-oss port keeps each expert as its own nn.Linear:
mlp.experts.gate_up_projs.{e} (in H, out 2I, gate and up interleaved as in
the fused tensor) and mlp.experts.down_projs.{e} (in I, out H). Unsloth
cannot be installed on the device, so this builds that layout itself:
transformers' GptOssForCausalLM with each layer's MLP replaced by one whose
experts are those Linears (weights and biases copied from the fused
tensors; the router's own weights), checked to give the fused model's
logits before any adapter. PEFT's LoRA then targets q_proj, v_proj and
every expert's two Linears (random A and B, init_lora_weights=False), and
save_pretrained writes the adapter under Unsloth's names.

    python3 tools/reference/peft_unsloth.py CHECKPOINT_DIR OUT_DIR
        writes OUT_DIR/unsloth_r4/ (adapter_model.safetensors,
        adapter_config.json) and OUT_DIR/unsloth_r4.safetensors with ids,
        subset_ids, logits_subset, logits_norm, argmax (and base_* without
        the adapter), as tools/reference/peft_lora.py does
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from peft_lora import logits_of, prompt_ids, write_fixture  # noqa: E402
from transformers_logits import load_manual  # noqa: E402

NAME = "unsloth_r4"
TARGETS = r".*\.(q_proj|v_proj)$|.*\.experts\.(gate_up_projs|down_projs)\.\d+$"


class Experts(nn.Module):
    """Unsloth's layout: a Linear per expert and projection."""

    def __init__(self, fused, limit, alpha=1.702):
        super().__init__()
        gu, gub = fused.gate_up_proj.detach(), fused.gate_up_proj_bias.detach()   # [E, H, 2I], [E, 2I]
        dn, dnb = fused.down_proj.detach(), fused.down_proj_bias.detach()         # [E, I, H], [E, H]
        E, H, I2 = gu.shape
        self.gate_up_projs = nn.ModuleList(nn.Linear(H, I2) for _ in range(E))
        self.down_projs = nn.ModuleList(nn.Linear(I2 // 2, H) for _ in range(E))
        with torch.no_grad():
            for e in range(E):
                self.gate_up_projs[e].weight.copy_(gu[e].t())
                self.gate_up_projs[e].bias.copy_(gub[e])
                self.down_projs[e].weight.copy_(dn[e].t())
                self.down_projs[e].bias.copy_(dnb[e])
        self.limit, self.alpha = limit, alpha

    def expert(self, e, x):
        gu = self.gate_up_projs[e](x)
        gate, up = gu[..., ::2].clamp(max=self.limit), gu[..., 1::2].clamp(-self.limit, self.limit)
        return self.down_projs[e]((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


class MLP(nn.Module):
    """gpt-oss's MoE block over Experts: top-k of the router's logits, a
    softmax over those k, each token's experts weighted and summed. Returns
    what the block it replaces returned (a tensor, or a tuple whose first
    element is the output and whose second is the router's scores)."""

    def __init__(self, mlp, k, limit, tuple_out):
        super().__init__()
        self.router = mlp.router
        self.experts = Experts(mlp.experts, limit)
        self.k, self.tuple_out = k, tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = F.linear(x, self.router.weight, self.router.bias)
        top, idx = torch.topk(logits, self.k, dim=-1)
        w = torch.softmax(top, dim=-1)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(self.k):
                out[t] += w[t, j] * self.experts.expert(int(idx[t, j]), x[t])
        out = out.reshape(shape)
        if not self.tuple_out:
            return out
        scores = torch.zeros_like(logits).scatter_(1, idx, w)
        return out, scores


def unsloth_layout(model):
    k = model.config.num_experts_per_tok
    probe = model.model.layers[0].mlp(torch.zeros(1, 2, model.config.hidden_size))
    tuple_out = isinstance(probe, tuple)
    for layer in model.model.layers:
        layer.mlp = MLP(layer.mlp, k, model.config.swiglu_limit, tuple_out)
    return model


def main(path, out):
    os.makedirs(out, exist_ok=True)
    fused = load_manual(path).eval()
    ids = prompt_ids(fused.config.vocab_size)
    fused_logits = logits_of(fused, ids)
    base = unsloth_layout(load_manual(path)).eval()
    base_logits = logits_of(base, ids)
    same = ((base_logits - fused_logits).norm() / fused_logits.norm()).item()
    print("Unsloth's layout against the fused experts: relative L2 %.3g" % same)
    assert same < 1e-5, "the per-expert layout does not reproduce the fused model"
    write_fixture(out, NAME, base, ids, base_logits, 200, dict(r=4, lora_alpha=8, target_modules=TARGETS),
                  {"layout": "unsloth per-expert Linear", "layout_vs_fused_rel_l2": "%.4g" % same})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
