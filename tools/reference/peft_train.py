#!/usr/bin/env python3
"""LoRA training reference: PEFT 0.21 + transformers, float32, on the tiny
checkpoint (seed 1); the oracle of spec/lora_train_spec.lua.

    python3 tools/reference/peft_train.py CHECKPOINT_DIR OUT_DIR

Runs: train_r4 (q/k/v/o) and train_experts_r4 (o_proj and every expert's
gate_up_proj and down_proj through target_parameters). Writes, per run,
OUT_DIR/<run>/ (the adapter before training, as PEFT saves it) and
OUT_DIR/<run>.safetensors with
  ids [T] I32, labels [T] I32 (-100 = not a target), loss [1] F64,
  grad.<PEFT tensor name> F32   d(mean loss)/d(weight), before any step,
  losses [5] F64                the loss before each of 5 AdamW steps,
  grad_norms [5] F64            the total gradient norm before clipping,
  step5.<PEFT tensor name> F32  the weights after the 5 steps.
AdamW: lr 1e-2, betas (0.9, 0.999), eps 1e-8, weight decay 0.01; gradients
clipped to a total norm of 1.0 (torch.nn.utils.clip_grad_norm_).
"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from transformers_logits import load_manual  # noqa: E402

LR, BETAS, EPS, WD, CLIP, STEPS = 1e-2, (0.9, 0.999), 1e-8, 0.01, 1.0, 5


RUNS = {
    "train_r4": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "train_experts_r4": dict(target_modules=["o_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
}


def main(path, out):
    for name, kw in RUNS.items():
        run(path, out, name, kw)


def run(path, out, name, kw):
    from peft import LoraConfig, get_peft_model
    import peft
    import transformers
    torch.manual_seed(0)
    base = load_manual(path)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 200000, (40,), generator=g)
    labels = ids.clone()
    labels[:12] = -100                      # the "prompt": not a target
    labels[25:28] = -100                    # and a masked span inside
    torch.manual_seed(5)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", init_lora_weights=False, task_type="CAUSAL_LM", **kw)
    model = get_peft_model(base, cfg)
    model.save_pretrained(os.path.join(out, name))
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def key(n):      # PEFT's saved name: the adapter name dropped
        return n.replace(".default", "")

    t = {"ids": ids.to(torch.int32), "labels": labels.to(torch.int32)}
    opt = torch.optim.AdamW(params.values(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids.unsqueeze(0), labels=labels.unsqueeze(0)).loss
        loss.backward()
        if step == 0:
            t["loss"] = loss.detach().to(torch.float64).reshape(1)
            for n, p in params.items():
                t["grad." + key(n)] = p.grad.detach().clone().contiguous()
        losses.append(loss.item())
        norms.append(torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP).item())
        opt.step()
    for n, p in params.items():
        t["step5." + key(n)] = p.detach().clone().contiguous()
    t["losses"] = torch.tensor(losses, dtype=torch.float64)
    t["grad_norms"] = torch.tensor(norms, dtype=torch.float64)
    save_file(t, os.path.join(out, name + ".safetensors"),
              metadata={"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__})
    print("%s: loss %.6f, losses %s, grad norms %s" % (name, t["loss"].item(), losses, norms))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
