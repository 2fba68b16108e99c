// Validates generated JSON against JSON Schemas with ajv (draft 2020-12)
// and ajv-formats: the independent validator of spec/schema_spec.lua.
//   node spec/support/ajv_validate.cjs cases.json  ->  one JSON line per case
// cases.json: [{ "schema": {...}, "text": "..." }, ...]
const fs = require("fs");
const path = require("path");
const root = path.resolve(__dirname, "../..");
const Ajv2020 = require(path.join(root, "node_modules/ajv/dist/2020")).default;
const addFormats = require(path.join(root, "node_modules/ajv-formats")).default;
const cases = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const out = cases.map((c) => {
  let value;
  try { value = JSON.parse(c.text); } catch (e) { return { ok: false, error: "JSON.parse: " + e.message }; }
  const ajv = new Ajv2020({ strict: false, allErrors: true });
  addFormats(ajv);
  const validate = ajv.compile(c.schema);
  const ok = validate(value);
  return { ok, error: ok ? null : ajv.errorsText(validate.errors) };
});
process.stdout.write(JSON.stringify(out));
