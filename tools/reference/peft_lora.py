#!/usr/bin/env python3
"""LoRA adapters written by Hugging Face PEFT on a checkpoint from
tools/make_checkpoint.lua, and the logits PEFT + transformers compute with
them, in float32: the oracle of spec/lora_spec.lua.

    python3 tools/reference/peft_lora.py CHECKPOINT_DIR OUT_DIR
        writes OUT_DIR/<name>/adapter_model.safetensors, adapter_config.json
        and OUT_DIR/<name>.safetensors with
          ids [T] I32, subset_ids [K] I32, logits_subset [T, K] F32,
          logits_norm [T] F64, argmax [T] I32  (base_* the same without it)
    python3 tools/reference/peft_lora.py --check CHECKPOINT_DIR ADAPTER_DIR REF.safetensors
        loads an adapter written by gptoss into PEFT and compares its logits
        with REF (the reverse direction of interop); prints the relative L2.

Adapters (random A and B, init_lora_weights=False, so both matter):
  attn_r4: r=4, alpha=8, q/k/v/o on every layer
  qv_rslora_r8: r=8, alpha=16, use_rslora, q and v on layers 1 and 2 only
  experts_r4: r=4, alpha=8, q and v, and every expert's gate_up_proj and
    down_proj (target_parameters, PEFT's ParamWrapper)
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file, load_file

sys.path.insert(0, os.path.dirname(__file__))
from transformers_logits import load_manual  # noqa: E402

CONFIGS = {
    "attn_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "qv_rslora_r8": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                         layers_to_transform=[1, 2]),
    "experts_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
}


def prompt_ids(vocab):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, min(vocab, 200000), (40,), generator=g)


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids.unsqueeze(0)).logits[0].to(torch.float64)


def summary(prefix, logits, subset):
    return {
        prefix + "logits_subset": logits[:, subset].to(torch.float32).contiguous(),
        prefix + "logits_norm": logits.norm(dim=-1).contiguous(),
        prefix + "argmax": logits.argmax(dim=-1).to(torch.int32).contiguous(),
    }


def make(path, out):
    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)
    for i, (name, kw) in enumerate(CONFIGS.items()):
        base = load_manual(path)
        base.eval()
        ids = prompt_ids(base.config.vocab_size)
        write_fixture(out, name, base, ids, logits_of(base, ids), 100 + i, kw)


def write_fixture(out, name, base, ids, base_logits, seed, kw, metadata=None):
    """PEFT's random LoRA (LoraConfig(**kw), torch seeded with seed) on
    base: the adapter at OUT/name/, and OUT/name.safetensors with the
    logits with and without it at a vocabulary subset (the one at seed 1
    plus each row's argmax); metadata joins the versions in its header."""
    from peft import LoraConfig, get_peft_model
    import peft
    import transformers
    g = torch.Generator().manual_seed(1)
    subset = torch.cat([torch.randint(0, base.config.vocab_size, (48,), generator=g),
                        base_logits.argmax(dim=-1)]).unique()
    torch.manual_seed(seed)
    cfg = LoraConfig(lora_dropout=0.0, bias="none", init_lora_weights=False, task_type="CAUSAL_LM", **kw)
    model = get_peft_model(base, cfg)
    model.eval()
    logits = logits_of(model, ids)
    model.save_pretrained(os.path.join(out, name))
    t = {"ids": ids.to(torch.int32), "subset_ids": subset.to(torch.int32)}
    t.update(summary("", logits, subset))
    t.update(summary("base_", base_logits, subset))
    rel = ((logits - base_logits).norm() / base_logits.norm()).item()
    meta = {"peft": peft.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "adapter_vs_base_rel_l2": "%.4g" % rel}
    meta.update(metadata or {})
    save_file(t, os.path.join(out, name + ".safetensors"), metadata=meta)
    print("%s: adapter moves the logits by relative L2 %.4g" % (name, rel))


def check(path, adapter, ref):
    from peft import PeftModel
    r = load_file(ref)
    base = load_manual(path)
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    logits = logits_of(model, r["ids"].long())
    got = logits[:, r["subset_ids"].long()]
    want = r["logits_subset"].to(torch.float64)
    rel = ((got - want).norm() / want.norm()).item()
    same = bool((logits.argmax(dim=-1).to(torch.int32) == r["argmax"]).all())
    print(json.dumps({"adapter": adapter, "rel_l2": rel, "argmax_equal": same}))
    return rel


if __name__ == "__main__":
    if sys.argv[1] == "--check":
        sys.exit(0 if check(*sys.argv[2:5]) <= 1e-4 else 1)
    make(sys.argv[1], sys.argv[2])
