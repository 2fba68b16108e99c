-- JSON Schema constraints over the JSON Schema Test Suite (issue 23): every
-- suite test group that has a valid instance, needs no remote $ref and whose
-- schema gptoss.schema can express is generated on the tiny random
-- checkpoint (whose unconstrained output is noise) and the output validated
-- by ajv under the group's draft (spec/support/ajv_suite_validate.cjs).
--
-- The suite is Debian's json-schema-test-suite package (the official suite,
-- drafts 4, 6 and 7; tools/install_deps.sh installs it): read from
-- /usr/share/json-schema-test-suite, or, where it is not installed, fetched
-- with `apt-get download` and unpacked into the git-ignored build/ (no root
-- needed). GPTOSS_SCHEMA_SUITE=DIR points at another copy's tests/ folder.
-- npm's json-schema-test-suite holds drafts 3 and 4 only.
local H = require "helpers"
local gptoss = require "gptoss"
local json = require "gptoss.json"
local schema = require "gptoss.schema"
local lfs = require "lfs"

local DRAFTS = { "draft7", "draft6", "draft4" }
local LIMITS = { max_string = 6, max_items = 3, max_properties = 2 }

local sh = require("support.npm").sh

--- the suite's tests/ folder, or nil, why
local function suite_dir()
  local env = os.getenv("GPTOSS_SCHEMA_SUITE")
  if env then
    if H.exists(env .. "/draft7") then return env end
    return nil, "GPTOSS_SCHEMA_SUITE=" .. env .. " has no draft7/"
  end
  local system = "/usr/share/json-schema-test-suite/tests"
  if H.exists(system .. "/draft7") then return system end
  local local_dir = "build/json-schema-test-suite"
  local tests = local_dir .. "/usr/share/json-schema-test-suite/tests"
  if H.exists(tests .. "/draft7") then return tests end
  os.execute("mkdir -p '" .. local_dir .. "'")
  local out, ok = sh("cd '" .. local_dir .. "' && apt-get download json-schema-test-suite && dpkg-deb -x json-schema-test-suite_*.deb .")
  if ok and H.exists(tests .. "/draft7") then return tests end
  return nil, "the JSON Schema Test Suite is neither installed (Debian package json-schema-test-suite,"
    .. " tools/install_deps.sh) nor downloadable: " .. out:gsub("%s+$", "")
end

local function install_ajv() return require("support.npm").install() end

-- the .json files under dir, sorted, recursively (optional/ and optional/format/ too)
local function json_files(dir, out)
  out = out or {}
  for _, e in ipairs(H.files(dir)) do
    local p = dir .. "/" .. e
    if lfs.attributes(p, "mode") == "directory" then json_files(p, out)
    elseif e:match("%.json$") then out[#out + 1] = p end
  end
  table.sort(out)
  return out
end

-- a $ref that leaves the document (the suite's remotes are served over http)
local function remote_ref(s)
  if type(s) ~= "table" then return false end
  for k, v in pairs(s) do
    if k == "$ref" and type(v) == "string" and v:sub(1, 1) ~= "#" then return true end
    if type(v) == "table" and remote_ref(v) then return true end
  end
  return false
end

-- what a refusal names: the keyword, "format X", or the message itself
local function refused_by(err)
  local kw = err:match("unsupported keyword '(.-)' at ")
  if kw then return kw end
  if err:find("oneOf alternatives", 1, true) then return "oneOf (alternatives that may overlap)" end
  local fmt = err:match("format '(.-)'")
  if fmt then return "format " .. fmt end
  return (err:gsub("^json_schema: ", ""):gsub(" at /.*$", ""):gsub(" at %(root%)$", ""))
end

--- the suite's groups, sorted into { cases = { {draft, file, description, schema = text, value} },
-- counts = { per draft: groups, no_valid, remote, refused, supported }, refused = { by = n } }
local function collect(dir)
  local cases, counts, refused = {}, {}, {}
  for _, draft in ipairs(DRAFTS) do
    local c = { groups = 0, no_valid = 0, remote = 0, refused = 0, supported = 0 }
    counts[draft] = c
    for _, file in ipairs(json_files(dir .. "/" .. draft)) do
      for _, g in ipairs(json.decode(H.read(file))) do
        c.groups = c.groups + 1
        local valid = false
        for _, t in ipairs(g.tests) do valid = valid or t.valid end
        if not valid then c.no_valid = c.no_valid + 1
        elseif remote_ref(g.schema) then c.remote = c.remote + 1
        else
          local ok, err = pcall(schema.to_gbnf, g.schema)
          if ok then
            c.supported = c.supported + 1
            cases[#cases + 1] = { draft = draft, file = file:sub(#dir + #draft + 3), description = g.description,
                                  value = g.schema, schema = json.encode_compact(g.schema) }
          else
            -- a refusal is an error naming what the grammar cannot express, never a crash
            assert(err:find("^json_schema: "), file .. " " .. g.description .. ": " .. err)
            c.refused = c.refused + 1
            local by = refused_by(err)
            refused[by] = (refused[by] or 0) + 1
          end
        end
      end
    end
  end
  return cases, counts, refused
end

-- each case validated under its own draft (ajv-draft-04, ajv's draft-06 meta-schema, draft-07)
local function ajv(cases) return require("support.ajv").validate(cases, "spec/support/ajv_suite_validate.cjs") end

-- the two faults the suite showed, against hand-checked instances (ajv as the oracle)
describe("gptoss.schema: allOf beside other keywords, oneOf's alternatives", function()
  it("allOf keeps the keywords beside it, and boolean members", function()
    local g = schema.to_gbnf('{"properties":{"bar":{"type":"integer"}},"required":["bar"],'
      .. '"allOf":[{"properties":{"foo":{"type":"string"}},"required":["foo"]},true]}')
    local core = gptoss.core
    local model = assert(gptoss.load(H.tiny()))
    finally(function() model:close() end)
    local voc = core.vocab(model.tokenizer, model.config.vocab_size)
    local function accepts(text)
      local m = core.matcher(core.grammar(g), voc)
      local ok = m:accept_bytes(text) and m:accepting() and true or false
      m:close()
      return ok
    end
    assert.is_false(accepts('{"foo":"x"}'))   -- bar is required too
    assert.is_false(accepts('{"bar":1}'))     -- and foo
    assert.is_true(accepts('{"bar":1,"foo":"x"}'))
    local ok, err = pcall(schema.to_gbnf, '{"allOf":[true,false]}')
    assert.is_false(ok)
    assert.is_truthy(err:find("schema false admits nothing at /allOf/1", 1, true), err)
  end)

  it("oneOf: overlapping alternatives are refused, disjoint ones kept", function()
    for _, s in ipairs {
      '{"oneOf":[{"type":"integer"},{"minimum":2}]}',
      '{"type":"string","oneOf":[{"minLength":2},{"maxLength":4}]}',
      '{"oneOf":[{"type":"number"},{"type":"integer"}]}',
      '{"oneOf":[{"enum":[1,2]},{"const":2}]}',
    } do
      local ok, err = pcall(schema.to_gbnf, s)
      assert.is_false(ok, s)
      assert.is_truthy(err:find("oneOf alternatives %d and %d may both match"), err)
    end
    for _, s in ipairs {
      '{"oneOf":[{"type":"string"},{"type":"integer"}]}',
      '{"oneOf":[{"const":"a"},{"enum":["b",1]}]}',
      '{"oneOf":[{"type":"object","properties":{"k":{"const":"a"}},"required":["k"]},'
        .. '{"type":"object","properties":{"k":{"const":"b"},"n":{}},"required":["k","n"]}]}',
    } do
      assert.is_string(schema.to_gbnf(s), s)
    end
  end)
end)

describe("json_schema constraints over the JSON Schema Test Suite", function()
  local dir, why = suite_dir()
  local ajv_ok, ajv_why = install_ajv()
  if not dir or not ajv_ok then
    pending("schema suite: " .. (why or ajv_why))
    return
  end

  it("every supported suite schema's generation validates with ajv under its draft", function()
    local cases, counts, refused = collect(dir)
    local model = assert(gptoss.load(H.tiny()))
    local eng = gptoss.engine(model, { max_batch = 96, max_queue = #cases })
    finally(function() eng:close(); model:close() end)
    local prompt = model.tokenizer:encode("Answer in JSON:")
    local reqs = {}
    for i, c in ipairs(cases) do
      reqs[i] = assert(eng:submit(prompt, { json_schema = c.value, seed = i, max_tokens = 400,
        json_options = { max_string = LIMITS.max_string, max_items = LIMITS.max_items,
                         max_properties = LIMITS.max_properties, compact = i % 2 == 0 } }))
    end
    for i, req in ipairs(reqs) do
      local r = req:result()
      local c = cases[i]
      assert.are.equal("stop", r.finish_reason, c.draft .. "/" .. c.file .. " '" .. c.description .. "' ended by "
        .. tostring(r.finish_reason))
      c.text = H.reply_bytes(model, r)
    end
    local bad, distinct = {}, {}
    for i, res in ipairs(ajv(cases)) do
      local c = cases[i]
      distinct[c.schema] = true
      if not res.ok then
        bad[#bad + 1] = string.format("%s/%s '%s': %s\n  schema %s\n  text %q", c.draft, c.file, c.description,
          tostring(res.error), c.schema, c.text)
      end
    end
    assert(#bad == 0, table.concat(bad, "\n"))

    local n_distinct = 0
    for _ in pairs(distinct) do n_distinct = n_distinct + 1 end
    local lines = {}
    for _, d in ipairs(DRAFTS) do
      local c = counts[d]
      lines[#lines + 1] = string.format("  %s: %d groups, %d generated and validated, %d refused, %d without a valid"
        .. " instance, %d with remote $ref", d, c.groups, c.supported, c.refused, c.no_valid, c.remote)
    end
    local by = {}
    for k in pairs(refused) do by[#by + 1] = k end
    table.sort(by, function(a, b) if refused[a] ~= refused[b] then return refused[a] > refused[b] end return a < b end)
    for i, k in ipairs(by) do by[i] = k .. " " .. refused[k] end
    -- with spec/schema_spec.lua's (generated and validated there): issue 23 asks for 200 distinct
    local ours, n_all = 0, n_distinct
    for _, file in ipairs { "spec/fixtures/grammar/schemas.txt", "spec/fixtures/grammar/schemas_more.txt" } do
      for line in io.lines(file) do
        if line ~= "" and line:sub(1, 1) ~= "#" then
          local key = json.encode_compact(json.decode(line))
          ours = ours + 1
          if not distinct[key] then distinct[key] = true; n_all = n_all + 1 end
        end
      end
    end
    io.stderr:write(string.format("\nschema suite: %d groups generated and validated (%d distinct schemas)\n%s\n"
      .. "  refused (over the drafts), by what the error names: %s\n"
      .. "  with the %d of spec/fixtures/grammar/schemas*.txt: %d distinct schemas\n",
      #cases, n_distinct, table.concat(lines, "\n"), table.concat(by, ", "), ours, n_all))
    -- drafts 4, 6 and 7 repeat most schemas, each validated under its own draft
    assert.is_true(#cases >= 200, #cases .. " suite groups generated")
    assert.is_true(n_distinct >= 73, n_distinct .. " distinct suite schemas generated")
    assert.is_true(n_all >= 200, n_all .. " distinct schemas, ours and the suite's")
  end)
end)
