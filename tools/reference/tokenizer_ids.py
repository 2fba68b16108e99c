#!/usr/bin/env python3
"""Expected token ids for the tokenizer parity corpus, from tiktoken.

Builds a tiktoken Encoding from the gpt-oss tokenizer.json (byte-level vocab
decoded through GPT-2's bytes_to_unicode, the file's Split regex, its special
tokens), encodes every corpus document with encode_ordinary, and writes the
ids as little-endian uint32 to OUT/NAME.ids. Hugging Face `tokenizers` encodes
the same text as a cross-check; its disagreements are reported, not written.

    python3 tools/reference/tokenizer_ids.py TOKENIZER_JSON CORPUS_DIR OUT_DIR
"""
import json
import os
import struct
import sys
import time


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def find_regex(pre):
    if pre.get("type") == "Split":
        return pre["pattern"]["Regex"]
    for p in pre.get("pretokenizers", []):
        r = find_regex(p)
        if r:
            return r
    return None


def build_tiktoken(path):
    import tiktoken
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    dec = {v: k for k, v in bytes_to_unicode().items()}
    ranks = {bytes(dec[ch] for ch in tok): rank for tok, rank in tj["model"]["vocab"].items()}
    specials = {t["content"]: t["id"] for t in tj["added_tokens"]}
    for i in range(max(specials.values()) + 1, 201088):
        specials.setdefault("<|reserved_%d|>" % i, i)
    pat = find_regex(tj["pre_tokenizer"])
    return tiktoken.Encoding(name="o200k_harmony_from_json", pat_str=pat, mergeable_ranks=ranks,
                             special_tokens=specials), tj


def main():
    tok_json, corpus, out = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)
    enc, _ = build_tiktoken(tok_json)
    hf = None
    try:
        from tokenizers import Tokenizer
        hf = Tokenizer.from_file(tok_json)
    except Exception as e:  # the cross-check is optional
        print("tokenizers unavailable:", e)
    # the published vectors, as a self-check of the reference itself
    assert enc.encode_ordinary("2 + 2 = 4.") == [17, 659, 220, 17, 314, 220, 19, 13]
    assert enc.encode_ordinary("hello world") == [24912, 2375]
    summary = {"documents": {}, "tiktoken": __import__("tiktoken").__version__}
    total_bytes = total_ids = 0
    for name in sorted(os.listdir(corpus)):
        if not name.endswith(".txt"):
            continue
        with open(os.path.join(corpus, name), "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
        ids = enc.encode_ordinary(text)
        assert enc.decode_bytes(ids) == raw, name
        with open(os.path.join(out, name[:-4] + ".ids"), "wb") as f:
            f.write(struct.pack("<%dI" % len(ids), *ids))
        doc = {"bytes": len(raw), "ids": len(ids)}
        if hf is not None:
            hids = hf.encode(text, add_special_tokens=False).ids
            doc["tokenizers_agrees"] = hids == ids
            if hids != ids:
                k = next((i for i, (a, b) in enumerate(zip(hids, ids)) if a != b), min(len(hids), len(ids)))
                doc["tokenizers_first_difference"] = k
        summary["documents"][name] = doc
        total_bytes += len(raw)
        total_ids += len(ids)
    summary["total_bytes"] = total_bytes
    summary["total_ids"] = total_ids
    with open(os.path.join(out, "SUMMARY.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    print("tokenizer_ids: %d documents, %d bytes, %d ids" % (len(summary["documents"]), total_bytes, total_ids))
    bad = [n for n, d in summary["documents"].items() if d.get("tokenizers_agrees") is False]
    print("tokenizers disagrees on:", bad or "none")


if __name__ == "__main__":
    main()
