--- bench/sweep/lr_rank_20b.lua: the LoRA sweep of issue 21 on the 20B shape
-- (tools/make_checkpoint.lua --preset 20b: gpt-oss-20b's shapes, random
-- weights): rank 8/16/32 x lr 1e-4/2e-4, 30 steps each, attention and
-- experts, batch 2, on cuda:0 in "mixed" precision. Its data are generated
-- here (arithmetic questions and answers in the Multilingual-Thinking
-- schema), 64 for training and 8 held out, so the run needs no download.
--
--   gptoss sweep bench/sweep/lr_rank_20b.lua --dir bench/sweep/lr_rank_20b
--   (tools/reference/device_sweep.sh runs it on the GPU machine)
local function example(i)
  local a, b = i * 7 % 23 + 2, i * 11 % 19 + 3
  return { messages = {
    { role = "user", content = string.format("What is %d + %d? Answer with the number only.", a, b) },
    { role = "assistant", thinking = string.format("%d plus %d is %d.", a, b, a + b), content = tostring(a + b) } },
    answer = tostring(a + b) }
end
local train, held_out, task = {}, {}, {}
for i = 1, 64 do train[i] = example(i) end
for i = 1, 8 do
  held_out[i] = example(100 + i)
  task[i] = { messages = { held_out[i].messages[1] }, answer = held_out[i].answer }
end

return {
  name = "lr_rank_20b", method = "grid",
  metric = { name = "eval_loss", goal = "minimize" },
  parameters = { r = { values = { 8, 16, 32 } }, lr = { values = { 1e-4, 2e-4 } } },
  trial = "lora",
  lora = {
    model = os.getenv("GPTOSS_SWEEP_MODEL") or "/tmp/gptoss-20b", device = "cuda:0", load = { precision = "mixed" },
    data = train, eval = held_out,
    adapter = { targets = { "attn", "experts" }, seed = 3407 },
    train = { steps = 30, batch = 2, grad_accum = 1, warmup = 3, schedule = "cosine", max_len = 512,
              eval_every = 10, checkpoint_every = 30, seed = 3407 },
    task = { data = task, max_tokens = 24, temperature = 0, reasoning = "low" },
  },
}
