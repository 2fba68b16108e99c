-- Prints the edge-case document of the tokenizer corpus: the inputs where a
-- pre-tokenizer or BPE most often goes wrong. Deterministic.
local function u(...)  -- code points to UTF-8 (works on Lua 5.1 too)
  local out = {}
  for _, c in ipairs { ... } do
    if c < 0x80 then out[#out + 1] = string.char(c)
    elseif c < 0x800 then out[#out + 1] = string.char(0xC0 + math.floor(c / 64), 0x80 + c % 64)
    elseif c < 0x10000 then
      out[#out + 1] = string.char(0xE0 + math.floor(c / 4096), 0x80 + math.floor(c / 64) % 64, 0x80 + c % 64)
    else
      out[#out + 1] = string.char(0xF0 + math.floor(c / 262144), 0x80 + math.floor(c / 4096) % 64,
        0x80 + math.floor(c / 64) % 64, 0x80 + c % 64)
    end
  end
  return table.concat(out)
end

local lines = {}
local function add(s) lines[#lines + 1] = s end

-- digits: runs of every length, grouping, other scripts' digits
for n = 1, 40 do add(("1234567890"):rep(5):sub(1, n)) end
add(("9876543210"):rep(60))
add("3.14159265358979 -42 +7e-10 0x7fffffff 1,000,000 1.000.000,50 2024-06-28T12:34:56Z 10^9 1/3")
add(u(0x0660, 0x0661, 0x0662, 0x0663) .. " " .. u(0x0966, 0x0967, 0x0968) .. " " .. u(0xFF11, 0xFF12, 0xFF13) ..
    " x" .. u(0x00B2, 0x00B3) .. " " .. u(0x216B, 0x2167) .. " " .. u(0x2460, 0x2461) .. " " .. u(0x1D7D8, 0x1D7D9))

-- whitespace: runs, tabs, CRLF, trailing spaces, Unicode spaces
for n = 1, 33, 4 do add(("x"):rep(3) .. (" "):rep(n) .. "y" .. ("\t"):rep(n % 5) .. "z") end
add((" "):rep(300) .. "end")
add("line one  \r\nline two\r\n\r\n\r\n  indented\r\n\ttab\r\n")
add("a\n\n\n\nb\r\r\rc \n \n \nd" .. ("\n"):rep(20) .. "e")
add("nbsp" .. u(0x00A0) .. "x ideographic" .. u(0x3000) .. "x thin" .. u(0x2009) .. "x em" .. u(0x2003) .. "x")
add("line" .. u(0x2028) .. "sep para" .. u(0x2029) .. "sep nel" .. u(0x0085) .. "x mvs" .. u(0x180E) .. "x zwsp" ..
    u(0x200B) .. "x bom" .. u(0xFEFF) .. "x ogham" .. u(0x1680) .. "x")
add("   \t  \n   \n\t\t\n" .. (" \t"):rep(40))

-- contractions in every case, and look-alikes that are not contractions
local words = { "it", "IT", "They", "THEY", "we", "We", "you", "YOU", "she", "I" }
local suffixes = { "s", "t", "re", "ve", "m", "ll", "d" }
for _, w in ipairs(words) do
  local row = {}
  for _, s in ipairs(suffixes) do
    row[#row + 1] = w .. "'" .. s
    row[#row + 1] = w .. "'" .. s:upper()
    row[#row + 1] = w .. "'" .. s:sub(1, 1):upper() .. s:sub(2)
    row[#row + 1] = w .. "'" .. s:sub(1, 1) .. s:sub(2):upper()
  end
  add(table.concat(row, " "))
end
add("don't DON'T Don'T rock'n'roll 'quoted' ''double'' it" .. u(0x2019) .. "s it'" .. u(0x017F) .. " o'clock y'all ma'am 'tis '90s")
add("'s 't alone: 's'S's 12's A's")

-- emoji: ZWJ sequences, modifiers, flags, keycaps, variation selectors
add(u(0x1F468, 0x200D, 0x1F469, 0x200D, 0x1F467, 0x200D, 0x1F466) .. " family " ..
    u(0x1F3F3, 0xFE0F, 0x200D, 0x1F308) .. " flag " .. u(0x1F44D, 0x1F3FD) .. " thumbs " ..
    u(0x1F1EF, 0x1F1F5, 0x1F1FA, 0x1F1F8) .. " flags " .. u(0x0031, 0xFE0F, 0x20E3) .. " keycap " ..
    u(0x1F9D1, 0x200D, 0x1F4BB) .. " technologist " .. u(0x2764, 0xFE0F, 0x200D, 0x1F525) .. " heart")
add(u(0x1F600, 0x1F601, 0x1F602, 0x1F923, 0x1F60A) .. u(0x1F680):rep(20) .. " " .. u(0x1F469, 0x1F3FE, 0x200D, 0x2695, 0xFE0F))
add("text" .. u(0x1F914) .. "text " .. u(0x1F914) .. "text" .. u(0x2728) .. u(0x2728) .. "!")

-- combining marks, stacked marks, scripts that live on them
add("e" .. u(0x0301) .. " a" .. u(0x0308) .. " n" .. u(0x0303) .. " o" .. u(0x0302, 0x0323) .. " cafe" .. u(0x0301) ..
    " Z" .. u(0x0351, 0x0352, 0x0353, 0x0354, 0x0355, 0x0356, 0x0357, 0x0358, 0x0359) .. "algo")
add(u(0x0928, 0x092E, 0x0938, 0x094D, 0x0924, 0x0947) .. " " .. u(0x0E2A, 0x0E27, 0x0E31, 0x0E2A, 0x0E14, 0x0E35) ..
    " " .. u(0x1100, 0x1161, 0x11A8) .. " " .. u(0xAC00, 0xAC01) .. " " .. u(0x05E9, 0x05C1, 0x05B8, 0x05DC, 0x05D5, 0x05B9, 0x05DD) ..
    " " .. u(0x0628, 0x0650, 0x0633, 0x0652, 0x0645, 0x0650))
add(u(0x0301) .. "leading mark " .. u(0x0301, 0x0301, 0x0301) .. " only marks " .. u(0x20DD) .. " enclosing")

-- mixed scripts and direction marks
add("English русский 日本語 中文 العربية עברית ελληνικά हिन्दी 한국어 ไทย " .. u(0x200E) .. "lrm " .. u(0x200F) .. "rlm " ..
    u(0x202B) .. "embed" .. u(0x202C))
add("ABCdef GHIjklMNO pqrSTU vwXYZ camelCaseWord PascalCase snake_case kebab-case SCREAMING_CASE " ..
    u(0x01C5) .. "titlecase " .. u(0x1E9E) .. "sharp " .. u(0x0130) .. "dotted " .. u(0x02B0) .. "modifier")

-- long runs that take the large-piece BPE path
add(("a"):rep(700))
add(("Ab"):rep(400))
add(("="):rep(600) .. " " .. ("-"):rep(300) .. ("*/"):rep(200))
add(("あ"):rep(300) .. " " .. ("漢字"):rep(200))
add("aGVsbG8gd29ybGQhIFRoaXMgaXMgYmFzZTY0IGVuY29kZWQgdGV4dCB0aGF0IGdvZXMgb24gYW5kIG9uIGFuZCBvbiBhbmQgb24gYW5kIG9u" ..
    "IGFuZCBvbiBhbmQgb24gYW5kIG9uIGFuZCBvbiBhbmQgb24gYW5kIG9uIGFuZCBvbg==")
add(("deadbeef"):rep(80))

-- punctuation, code-like text and URLs
add("https://example.com/path/to/file.html?query=1&b=%20x#frag mailto:a@b.c C:\\Windows\\system32 ./a/../b ~/x")
add("{\"key\": [1, 2.5, -3e+8, true, null, \"v\\u00e9\"], 'k': (a||b) && !c} <tag attr=\"1\"/> <!-- c --> $x @y #z")
add("if (x >= 10 && y != 0) { return x / y; } // comment /* block */ a->b ::c <<= >>= ... ?? ?. => -> |> <=>")
add("!!!??? ... --- ___ +++ *** ### $$$ %%% ^^^ &&& ||| ~~~ ``` \"\"\" ''' ((( ))) [[[ ]]] {{{ }}}")

-- strings that look like special tokens are plain text in ordinary encoding
add("<|start|>user<|message|>hi<|end|> <|endoftext|> <|reserved_200014|> <|return|><|call|> <| |> <|>")

-- control characters (valid UTF-8) and a NUL
add("bell\7 backspace\8 escape\27[0m vt\11 ff\12 nul\0 after-nul \1\2\3\31 del\127")
add(u(0x10FFFF) .. " max scalar " .. u(0xE000) .. " private " .. u(0xFFFD) .. " replacement " .. u(0x1D400, 0x1D401) .. " math")

io.write(table.concat(lines, "\n"), "\n")
