// Validates generated JSON against the JSON Schema Test Suite's schemas with
// ajv, each under its suite's draft: draft-07 (Ajv), draft-06 (Ajv with the
// draft-06 meta-schema), draft-04 (ajv-draft-04); ajv-formats for "format".
// The independent validator of spec/schema_suite_spec.lua.
//   node spec/support/ajv_suite_validate.cjs cases.json  ->  one JSON array
// cases.json: [{ "draft": "draft7", "schema": {...}, "text": "..." }, ...]
const fs = require("fs");
const path = require("path");
const root = path.resolve(__dirname, "../..");
const mod = (name) => require(path.join(root, "node_modules", name));
const Ajv = mod("ajv").default;
const AjvDraft04 = mod("ajv-draft-04").default;
const addFormats = mod("ajv-formats").default;
const draft06 = mod("ajv/dist/refs/json-schema-draft-06.json");

function validator(draft) {
  let ajv;
  if (draft === "draft4") ajv = new AjvDraft04({ strict: false, allErrors: true });
  else {
    ajv = new Ajv({ strict: false, allErrors: true });
    if (draft === "draft6") ajv.addMetaSchema(draft06);
    else if (draft !== "draft7") throw new Error("unknown draft " + draft);
  }
  addFormats(ajv);
  return ajv;
}

const cases = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const out = cases.map((c) => {
  let value;
  try { value = JSON.parse(c.text); } catch (e) { return { ok: false, error: "JSON.parse: " + e.message }; }
  const ajv = validator(c.draft);
  const validate = ajv.compile(c.schema);
  const ok = validate(value);
  return { ok, error: ok ? null : ajv.errorsText(validate.errors) };
});
process.stdout.write(JSON.stringify(out));
