#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets (make fuzz) into
spec/fixtures/fuzz/<target>/seed-*: small valid inputs of each format, built
here from the formats' definitions and the repository's fixtures. Run from
the repository root, with tokenizer/ fetched; harmony_tokens seeds come from
tools/fuzz/make_token_seeds.lua (it needs the tokenizer)."""
import json, os, struct, glob

OUT = "spec/fixtures/fuzz"

def put(target, name, data):
    os.makedirs(f"{OUT}/{target}", exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(f"{OUT}/{target}/seed-{name}", "wb") as f:
        f.write(data)

def st(tensors, metadata=None):
    """a safetensors file: {name: (dtype, shape, bytes)} laid out in order"""
    hdr, blobs, off = {}, [], 0
    if metadata:
        hdr["__metadata__"] = metadata
    for name, (dt, shape, b) in tensors.items():
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(hdr, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)

f32 = lambda *v: struct.pack(f"<{len(v)}f", *v)

# safetensors: 0x00 + a file, 0x80 + an index next to a.st (x: F32 [2])
put("safetensors", "f32", b"\0" + st({"x": ("F32", [2, 2], f32(1, 2, 3, 4))}, {"format": "pt"}))
put("safetensors", "mixed", b"\0" + st({"a": ("BF16", [3], b"\x80\x3f" * 3), "b": ("U8", [2, 1, 2], b"\1\2\3\4"),
                                        "c": ("I64", [], b"\0" * 8), "e": ("F32", [0, 4], b"")}))
put("safetensors", "index", b"\x80" + json.dumps({"metadata": {"total_size": 8}, "weight_map": {"x": "a.st"}}).encode())

# config.json: the repository's micro config and the 20b one
micro = {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "eos_token_id": [200002, 199999],
         "experts_per_token": 2, "head_dim": 16, "hidden_size": 64, "initial_context_length": 128,
         "intermediate_size": 64, "layer_types": ["sliding_attention", "full_attention"],
         "max_position_embeddings": 4096, "model_type": "gpt_oss", "num_attention_heads": 4,
         "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2, "num_local_experts": 4,
         "pad_token_id": 199999, "quantization_config": {"quant_method": "mxfp4"}, "rms_norm_eps": 1e-05,
         "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                          "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
         "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
         "vocab_size": 201088}
put("config", "micro", json.dumps(micro, indent=2))
plain = dict(micro, rope_scaling=None, eos_token_id=200002, layer_types=None)
put("config", "plain", json.dumps(plain))

# adapter: adapter_config.json, FF FE, adapter_model.safetensors
def adapter(cfg, tensors):
    return json.dumps(cfg).encode() + b"\xff\xfe" + st(tensors)
pre = "base_model.model.model.layers.%d.%s"
cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"], "use_rslora": False,
       "lora_dropout": 0.0, "bias": "none"}
put("adapter", "q", adapter(cfg, {pre % (0, "self_attn.q_proj.lora_A.weight"): ("F32", [1, 4], f32(1, 2, 3, 4)),
                                  pre % (0, "self_attn.q_proj.lora_B.weight"): ("F32", [2, 1], f32(5, 6))}))
cfg2 = dict(cfg, r=2, use_rslora=True, target_modules=["v_proj", "o_proj"], layers_to_transform=[1])
put("adapter", "vo", adapter(cfg2, {pre % (1, "self_attn.v_proj.lora_A.weight"): ("BF16", [2, 2], b"\x80\x3f" * 4),
                                    pre % (1, "self_attn.v_proj.lora_B.weight"): ("BF16", [2, 2], b"\x80\x3f" * 4),
                                    pre % (1, "self_attn.o_proj.lora_A.weight"): ("F32", [2, 2], f32(1, 2, 3, 4)),
                                    pre % (1, "self_attn.o_proj.lora_B.weight"): ("F32", [2, 2], f32(1, 2, 3, 4))}))
cfg3 = dict(cfg, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
put("adapter", "experts", adapter(cfg3, {pre % (0, "mlp.experts.base_layer.lora_A.weight"): ("F32", [2, 2], f32(1, 2, 3, 4)),
                                         pre % (0, "mlp.experts.base_layer.lora_B.weight"): ("F32", [4, 2], f32(*range(8))),
                                         pre % (0, "mlp.experts.lora_A.weight"): ("F32", [2, 2], f32(1, 2, 3, 4)),
                                         pre % (0, "mlp.experts.lora_B.weight"): ("F32", [2, 2], f32(1, 2, 3, 4))}))
for d in sorted(glob.glob("spec/fixtures/lora/*/adapter_config.json"))[:1]:
    put("adapter", "peft", open(d, "rb").read() + b"\xff\xfe" + st({pre % (1, "self_attn.q_proj.lora_A.weight"): ("F32", [8, 2], f32(*range(16))),
                                                                           pre % (1, "self_attn.q_proj.lora_B.weight"): ("F32", [2, 8], f32(*range(16)))}))

# tokenizer.json: the real file's structure with a 256-byte vocabulary, a few merges and the specials
real = json.load(open("tokenizer/tokenizer.json"))
vocab = {k: v for k, v in real["model"]["vocab"].items() if v < 300}
merges = [m for m in real["model"]["merges"][:200]]
merges = [m for m in merges if "".join(m if isinstance(m, list) else m.split(" ")) in vocab][:40]
small = dict(real, model=dict(real["model"], vocab=vocab, merges=merges))
put("tokjson", "small", json.dumps(small))
put("tokjson", "nospecial", json.dumps(dict(small, added_tokens=[])))

# JSON decoder
for i, t in enumerate(['{"a": [1, -2.5e3, true, false, null], "b": {"c": "\\u00e9\\ud83d\\ude00\\n"}}', '[]', '{}',
                       '"x"', '0', '[[[[{"k": []}]]]]', '{"type": "object", "properties": {"loc": {"type": "string"}}}']):
    put("json", str(i), t)

# harmony text: the repository's parse fixtures
n = 0
for path in sorted(glob.glob("spec/fixtures/harmony/own/*.json")):
    c = json.load(open(path))
    if isinstance(c, dict) and isinstance(c.get("completion_text"), str):
        put("harmony_text", os.path.basename(path)[:-5], c["completion_text"]); n += 1
put("harmony_text", "plain", "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>")

# training JSONL: both schemas and a bad line
lines = open("spec/fixtures/lora/train.jsonl", "rb").read().split(b"\n")
put("jsonl", "train", b"\n".join(lines[:2]) + b"\n")
put("jsonl", "text", '{"text": "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>"}\n'
                     '{"messages": []}\nnot json\n')
