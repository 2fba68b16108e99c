// ajv's verdicts (draft 2020-12, with ajv-formats) on many texts against one
// schema, compiled once: the oracle of spec/schema_count_spec.lua.
//   node spec/support/ajv_verdicts.cjs cases.json  ->  a JSON array of booleans
// cases.json: { "schema": {...}, "texts": ["...", ...] }
const fs = require("fs");
const path = require("path");
const root = path.resolve(__dirname, "../..");
const Ajv2020 = require(path.join(root, "node_modules/ajv/dist/2020")).default;
const addFormats = require(path.join(root, "node_modules/ajv-formats")).default;
const cases = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const ajv = new Ajv2020({ strict: false });
addFormats(ajv);
const validate = ajv.compile(cases.schema);
const out = cases.texts.map((text) => {
  let value;
  try { value = JSON.parse(text); } catch (e) { return false; }
  return validate(value);
});
process.stdout.write(JSON.stringify(out));
