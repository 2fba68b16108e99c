// The server specs' client: OpenAI's official SDK for Node (npm `openai`)
// against the server. node sdk.mjs BASE_URL SCENARIO [MODEL] prints the
// scenario's findings as JSON on stdout.
import OpenAI from "openai";

const [base, scenario, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: base, apiKey: process.env.GPTOSS_API_KEY || "none", maxRetries: 0 });

const weather = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Weather for a city.",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};

const scenarios = {
  // a streamed chat: the deltas of each field, the finish reason, the usage chunk
  async chat_stream() {
    const stream = await client.chat.completions.create({
      model, messages: [{ role: "user", content: "Hi" }], max_completion_tokens: 30,
      reasoning_effort: "low", stream: true, stream_options: { include_usage: true },
    });
    const out = { content: "", reasoning: "", chunks: 0, finish: null, usage: null, role: null, last_choices: null };
    for await (const chunk of stream) {
      out.chunks++;
      out.object = chunk.object;
      out.last_choices = chunk.choices.length;
      if (chunk.usage) out.usage = chunk.usage;
      for (const c of chunk.choices) {
        if (c.delta.role) out.role = c.delta.role;
        if (c.delta.content) out.content += c.delta.content;
        if (c.delta.reasoning_content) out.reasoning += c.delta.reasoning_content;
        if (c.finish_reason) out.finish = c.finish_reason;
      }
    }
    return out;
  },
  // a tool call, then its result sent back
  async chat_tool() {
    const messages = [{ role: "user", content: "What is the weather in Paris?" }];
    const first = await client.chat.completions.create({ model, messages, tools: [weather], max_tokens: 40 });
    const msg = first.choices[0].message;
    messages.push(msg);
    for (const call of msg.tool_calls || []) {
      messages.push({ role: "tool", tool_call_id: call.id, content: JSON.stringify({ temperature: 20 }) });
    }
    const second = await client.chat.completions.create({ model, messages, tools: [weather], max_tokens: 40 });
    // the same call, streamed: tool call deltas add up
    const stream = await client.chat.completions.create({
      model, messages: [messages[0]], tools: [weather], tool_choice: "auto", max_tokens: 40, stream: true });
    const streamed = { name: "", arguments: "", id: null, finish: null };
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        for (const tc of c.delta.tool_calls || []) {
          if (tc.id) streamed.id = tc.id;
          if (tc.function?.name) streamed.name += tc.function.name;
          if (tc.function?.arguments) streamed.arguments += tc.function.arguments;
        }
        if (c.finish_reason) streamed.finish = c.finish_reason;
      }
    }
    return { first, second, streamed };
  },
  // the Responses API, plain and streamed, and a function tool
  async responses() {
    const plain = await client.responses.create({ model, input: "Hi", instructions: "Be brief.",
      reasoning: { effort: "low" }, max_output_tokens: 30 });
    const stream = await client.responses.create({ model, input: [{ role: "user", content: "Hi" }],
      max_output_tokens: 30, stream: true });
    const events = [];
    let text = "", reasoning = "", done = null;
    for await (const e of stream) {
      events.push(e.type);
      if (e.type === "response.output_text.delta") text += e.delta;
      if (e.type === "response.reasoning_text.delta") reasoning += e.delta;
      if (e.type === "response.completed") done = e.response;
    }
    return { plain, output_text: plain.output_text, events, text, reasoning, done };
  },
  async responses_tool() {
    const tools = [{ type: "function", name: "get_weather", description: "Weather for a city.",
      parameters: weather.function.parameters, strict: false }];
    const r = await client.responses.create({ model, input: "Weather in Paris?", tools, max_output_tokens: 40 });
    const call = r.output.find((i) => i.type === "function_call");
    const r2 = await client.responses.create({ model, tools, max_output_tokens: 40, input: [
      { role: "user", content: "Weather in Paris?" }, call,
      { type: "function_call_output", call_id: call.call_id, output: "{\"temperature\":20}" }] });
    return { r, call, r2 };
  },
  // logprobs as the SDK reads them: chat (plain, and streamed through its
  // ChatCompletionStream, which adds the chunks' logprobs up), completions
  // and responses (include message.output_text.logprobs)
  async logprobs() {
    const ask = { model, messages: [{ role: "user", content: "Hi" }], max_tokens: 30, reasoning_effort: "low",
      logprobs: true, top_logprobs: 3 };
    const plain = await client.chat.completions.create(ask);
    const runner = client.chat.completions.stream(ask);
    let deltas = 0, done = null;
    runner.on("logprobs.content.delta", ({ content }) => { deltas += content.length; });
    runner.on("logprobs.content.done", ({ content }) => { done = content; });
    const streamed = await runner.finalChatCompletion();
    const completion = await client.completions.create({ model, prompt: "Hello", max_tokens: 3, logprobs: 2,
      temperature: 0 });
    const response = await client.responses.create({ model, input: "Hi", reasoning: { effort: "low" },
      max_output_tokens: 30, include: ["message.output_text.logprobs"], top_logprobs: 3 });
    const message = response.output.find((i) => i.type === "message");
    return { plain: plain.choices[0], streamed: streamed.choices[0], deltas, done, completion: completion.choices[0],
      response: message.content[0], output_text: response.output_text };
  },
  // /v1/models and one model
  async models() {
    const list = [];
    for await (const m of client.models.list()) list.push(m.id);
    const one = await client.models.retrieve(list[list.length - 1]);
    return { list, one };
  },
  // an error as the SDK surfaces it
  async error() {
    try {
      await client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "Hi" }] });
      return { ok: true };
    } catch (e) {
      return { status: e.status, code: e.code, type: e.type, param: e.param, message: e.message };
    }
  },
  // many short requests one after another (the memory spec)
  async sequential() {
    const n = Number(process.env.N || 500);
    let done = 0;
    for (let i = 0; i < n; i++) {
      const r = await client.chat.completions.create({ model, messages: [{ role: "user", content: `Request ${i}` }],
        max_tokens: 1, seed: i });
      if (r.choices.length === 1) done++;
    }
    return { done };
  },
};

const run = scenarios[scenario];
if (!run) { console.error(`unknown scenario ${scenario}`); process.exit(2); }
run().then((r) => { process.stdout.write(JSON.stringify(r)); })
  .catch((e) => { console.error(e.stack || String(e)); process.exit(1); });
