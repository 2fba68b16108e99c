--- gptoss.server.metrics: counters and histograms of one server process, in
-- Prometheus' text exposition format, named as vLLM names its own
-- (vllm:time_to_first_token_seconds becomes gptoss:time_to_first_token_seconds).
-- A worker holds its own; with one worker per GPU, scrape each.
local M = {}

-- the buckets vLLM uses for its latency histograms
local TTFT_BUCKETS = { 0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80 }
local ITL_BUCKETS = { 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80 }
local E2E_BUCKETS = { 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920 }

local Histogram = {}
Histogram.__index = Histogram

local function histogram(name, help, buckets)
  local counts = {}
  for i = 1, #buckets do counts[i] = 0 end
  return setmetatable({ name = name, help = help, buckets = buckets, counts = counts, sum = 0, count = 0 }, Histogram)
end

function Histogram:observe(v)
  self.sum, self.count = self.sum + v, self.count + 1
  local b = self.buckets
  for i = 1, #b do if v <= b[i] then self.counts[i] = self.counts[i] + 1 end end
end

local function num(v)
  if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return string.format("%.0f", v) end
  return string.format("%.9g", v)
end

function Histogram:render(out, labels)
  out[#out + 1] = "# HELP " .. self.name .. " " .. self.help
  out[#out + 1] = "# TYPE " .. self.name .. " histogram"
  for i, le in ipairs(self.buckets) do
    out[#out + 1] = string.format('%s_bucket{%sle="%s"} %s', self.name, labels, num(le), num(self.counts[i]))
  end
  out[#out + 1] = string.format('%s_bucket{%sle="+Inf"} %s', self.name, labels, num(self.count))
  out[#out + 1] = string.format("%s_sum{%s} %s", self.name, labels:sub(1, -2), num(self.sum))
  out[#out + 1] = string.format("%s_count{%s} %s", self.name, labels:sub(1, -2), num(self.count))
end

--- M.new(model_name) -> a metrics set
function M.new(model_name)
  return {
    model = model_name,
    requests = {},          -- [endpoint .. " " .. status] = count
    finished = {},          -- [finish reason] = count
    prompt_tokens = 0, generation_tokens = 0, in_flight = 0,
    ttft = histogram("gptoss:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS),
    itl = histogram("gptoss:inter_token_latency_seconds", "Time between output tokens in seconds.", ITL_BUCKETS),
    e2e = histogram("gptoss:e2e_request_latency_seconds", "End to end request latency in seconds.", E2E_BUCKETS),
  }
end

function M.count_request(m, endpoint, status)
  local k = endpoint .. " " .. status
  m.requests[k] = (m.requests[k] or 0) + 1
end

function M.count_finished(m, reason, prompt_tokens, generation_tokens)
  m.finished[reason] = (m.finished[reason] or 0) + 1
  m.prompt_tokens = m.prompt_tokens + (prompt_tokens or 0)
  m.generation_tokens = m.generation_tokens + (generation_tokens or 0)
end

local function sorted_keys(t)
  local ks = {}
  for k in pairs(t) do ks[#ks + 1] = k end
  table.sort(ks)
  return ks
end

--- M.render(m, stats) -> the exposition text; stats is the engine's
-- eng:stats() (or nil while none runs)
function M.render(m, stats)
  local lbl = string.format('model_name="%s",', m.model:gsub('[\\"]', "\\%0"):gsub("\n", "\\n"))
  local base = lbl:sub(1, -2)
  local out = {}
  local function metric(name, kind, help, value, extra)
    out[#out + 1] = "# HELP " .. name .. " " .. help
    out[#out + 1] = "# TYPE " .. name .. " " .. kind
    out[#out + 1] = string.format("%s{%s%s} %s", name, base, extra or "", num(value or 0))
  end
  stats = stats or {}
  metric("gptoss:num_requests_running", "gauge", "Requests the engine is decoding.", stats.active)
  metric("gptoss:num_requests_waiting", "gauge", "Requests waiting in the engine's queue.", stats.queued)
  metric("gptoss:num_requests_in_flight", "gauge", "HTTP requests the server is answering.", m.in_flight)
  metric("gptoss:kv_cache_bytes", "gauge", "KV cache memory in use, in bytes.", stats.kv_in_use)
  metric("gptoss:prefix_cache_hits_total", "counter", "Requests that reused a cached prefix.", stats.prefix_hits)
  metric("gptoss:engine_tokens_per_second", "gauge", "The engine's recent output tokens per second.", stats.tokens_per_s)
  metric("gptoss:prompt_tokens_total", "counter", "Prompt tokens processed.", m.prompt_tokens)
  metric("gptoss:generation_tokens_total", "counter", "Generation tokens produced.", m.generation_tokens)
  out[#out + 1] = "# HELP gptoss:request_success_total Finished requests by finish reason."
  out[#out + 1] = "# TYPE gptoss:request_success_total counter"
  for _, k in ipairs(sorted_keys(m.finished)) do
    out[#out + 1] = string.format('gptoss:request_success_total{%sfinished_reason="%s"} %s', lbl, k, num(m.finished[k]))
  end
  out[#out + 1] = "# HELP gptoss:http_requests_total HTTP requests by endpoint and status."
  out[#out + 1] = "# TYPE gptoss:http_requests_total counter"
  for _, k in ipairs(sorted_keys(m.requests)) do
    local ep, st = k:match("^(.*) (%d+)$")
    out[#out + 1] = string.format('gptoss:http_requests_total{%sendpoint="%s",status="%s"} %s', lbl, ep, st, num(m.requests[k]))
  end
  m.ttft:render(out, lbl)
  m.itl:render(out, lbl)
  m.e2e:render(out, lbl)
  out[#out + 1] = ""
  return table.concat(out, "\n")
end

return M
