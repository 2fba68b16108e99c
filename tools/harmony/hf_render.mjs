// Renders spec/fixtures/harmony/hf/inputs.json with @huggingface/jinja, for
// development without the device: node tools/harmony/hf_render.mjs IN OUT
// (needs `npm install @huggingface/jinja` in NODE_PATH or here).
import fs from "fs";
import { Template } from "@huggingface/jinja";
const [inp, out, tmpl] = process.argv.slice(2);
const src = fs.readFileSync(tmpl || "../shared/reference/chat_template.jinja", "utf8");
const RealDate = Date;
const cases = JSON.parse(fs.readFileSync(inp, "utf8"));
const res = {};
for (const c of cases) {
  globalThis.Date = class extends RealDate {
    constructor(...a) { if (a.length === 0) super(c.date + "T12:00:00Z"); else super(...a); }
    static now() { return new RealDate(c.date + "T12:00:00Z").getTime(); }
  };
  const vars = { messages: c.messages, add_generation_prompt: c.add_generation_prompt, bos_token: "", eos_token: "" };
  for (const k of ["tools", "builtin_tools", "model_identity", "reasoning_effort"]) if (c[k] !== undefined) vars[k] = c[k];
  try { res[c.name] = { text: new Template(src).render(vars) }; }
  catch (e) { res[c.name] = { error: String(e.message || e) }; }
  globalThis.Date = RealDate;
}
fs.writeFileSync(out, JSON.stringify(res, null, 1));
console.log("rendered", Object.keys(res).length);
