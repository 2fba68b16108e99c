#!/usr/bin/env python3
"""Writes spec/fixtures/harmony/own/*.json: the project's harmony vectors.

Each expected text or message list is written out by hand here from the
rules of ../shared/reference/gpt-oss.md section 5 (cited per vector), not
produced by the renderer under test.
"""
import json, os, sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "spec/fixtures/harmony/own"
ID = "You are ChatGPT, a large language model trained by OpenAI."
SYS = "<|start|>system<|message|>" + ID + "\nKnowledge cutoff: 2024-06\n"
CH = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
CALLS = "\nCalls to these tools must go to the commentary channel: 'functions'."
PY = ("## python\n\nUse this tool to execute Python code in your chain of thought. The code will not be shown to the user. "
      "This tool should be used for internal reasoning, but not for code that is intended to be visible to the user "
      "(e.g. when creating plots, tables, or files).\n\nWhen you send a message containing Python code to python, it will be "
      "executed in a stateful Jupyter notebook environment. python will respond with the output of the execution or time out "
      "after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for this "
      "session is UNKNOWN. Depends on the cluster.")
WEATHER = {"name": "get_current_weather", "description": "Gets the current weather in the provided location.",
           "parameters": {"type": "object", "properties": {
               "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
               "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
               "required": ["location"]}}
WEATHER_TS = ("// Gets the current weather in the provided location.\ntype get_current_weather = (_: {\n"
              "// The city and state, e.g. San Francisco, CA\nlocation: string,\n"
              "format?: \"celsius\" | \"fahrenheit\", // default: celsius\n}) => any;\n")

V = []
def vec(name, rule, **kw):
    d = {"name": name, "rule": rule}
    d.update(kw)
    V.append(d)

# ---- system message (5.3)
vec("system_default_with_date", "5.3: identity, cutoff and date lines joined by \\n; sections joined by \\n\\n; default reasoning medium",
    kind="render_completion", next_role="assistant", system={"date": "2026-11-22"},
    messages=[{"role": "user", "content": "Hi"}],
    expected_text=SYS + "Current date: 2026-11-22\n\nReasoning: medium\n\n" + CH + "<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant")
vec("system_reasoning_high_no_date", "5.3: Current date is emitted only if set; reasoning effort high",
    kind="render_completion", next_role="assistant", system={"reasoning": "high"},
    messages=[{"role": "user", "content": "Prove it."}],
    expected_text=SYS + "\nReasoning: high\n\n" + CH + "<|end|><|start|>user<|message|>Prove it.<|end|><|start|>assistant")
vec("system_python_tool", "5.3: built-in python tool goes in the system message as '# Tools' then '## python' and its text",
    kind="render_completion", next_role="assistant", system={"reasoning": "low", "tools": ["python"]},
    messages=[{"role": "user", "content": "Compute 2**100."}],
    expected_text=SYS + "\nReasoning: low\n\n# Tools\n\n" + PY + "\n\n" + CH + "<|end|><|start|>user<|message|>Compute 2**100.<|end|><|start|>assistant")
vec("system_identity_and_cutoff_override", "5.3: the identity and knowledge cutoff lines take the given values",
    kind="render_conversation", system={"identity": "You are a terse assistant.", "knowledge_cutoff": "2025-01"},
    messages=[],
    expected_text="<|start|>system<|message|>You are a terse assistant.\nKnowledge cutoff: 2025-01\n\nReasoning: medium\n\n" + CH + "<|end|>")
vec("system_channels_not_required", "5.3: the valid-channels line lists the channels; 'Channel must be included' only when channels are required",
    kind="render_conversation", system={"channels": ["analysis", "final"], "channel_required": False},
    messages=[],
    expected_text=SYS + "\nReasoning: medium\n\n# Valid channels: analysis, final.<|end|>")
vec("system_calls_line_with_functions", "5.3/5.4: a developer message with function tools adds the 'Calls to these tools' line to the system message",
    kind="render_completion", next_role="assistant", system={},
    developer={"instructions": "Use a friendly tone.", "tools": [WEATHER]},
    messages=[{"role": "user", "content": "What is the weather like in SF?"}],
    expected_text=SYS + "\nReasoning: medium\n\n" + CH + CALLS + "<|end|><|start|>developer<|message|># Instructions\n\nUse a friendly tone.\n\n# Tools\n\n## functions\n\nnamespace functions {\n\n" + WEATHER_TS + "\n} // namespace functions<|end|><|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant")

# ---- developer message and tool schemas (5.4)
vec("developer_instructions_only", "5.4: developer sections are '# Instructions' and the text, joined by \\n\\n",
    kind="render_conversation", messages=[{"role": "developer", "content": {"instructions": "Answer in French."}}],
    expected_text="<|start|>developer<|message|># Instructions\n\nAnswer in French.<|end|>")
vec("tool_without_parameters", "5.4: a tool with no parameters renders as type NAME = () => any;",
    kind="render_conversation", messages=[{"role": "developer", "content": {"tools": [{"name": "ping", "description": "Checks the service."}]}}],
    expected_text="<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n// Checks the service.\ntype ping = () => any;\n\n} // namespace functions<|end|>")
vec("tool_types_integer_array_nullable", "5.4: integer renders as number, arrays as T[], nullable as T | null, optional fields get ?",
    kind="render_conversation", messages=[{"role": "developer", "content": {"tools": [{"name": "search", "description": "Searches.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
            "cursor": {"type": "string", "nullable": True}}, "required": ["query", "limit"]}}]}}],
    expected_text="<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n// Searches.\ntype search = (_: {\nquery: string,\nlimit: number,\ntags?: string[],\ncursor?: string | null,\n}) => any;\n\n} // namespace functions<|end|>")
vec("tool_defaults", "5.4: ' // default: X' follows the field; quoted only for non-enum strings",
    kind="render_conversation", messages=[{"role": "developer", "content": {"tools": [{"name": "fetch", "description": "Fetches a page.",
        "parameters": {"type": "object", "properties": {
            "url": {"type": "string", "default": "https://example.com"}, "retries": {"type": "number", "default": 3},
            "follow": {"type": "boolean", "default": True}, "mode": {"type": "string", "enum": ["fast", "slow"], "default": "fast"}},
            "required": []}}]}}],
    expected_text="<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n// Fetches a page.\ntype fetch = (_: {\nurl?: string, // default: \"https://example.com\"\nretries?: number, // default: 3\nfollow?: boolean, // default: true\nmode?: \"fast\" | \"slow\", // default: fast\n}) => any;\n\n} // namespace functions<|end|>")
vec("tool_nested_object", "5.4: nested objects render their properties with the nested indent, and keep JSON key order",
    kind="render_conversation", messages=[{"role": "developer", "content": {"tools": [{"name": "book", "description": "Books a trip.",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string"},
            "when": {"type": "object", "properties": {"date": {"type": "string"}, "flexible": {"type": "boolean"}}, "required": ["date"]}},
            "required": ["to", "when"]}}]}}],
    expected_text="<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n// Books a trip.\ntype book = (_: {\nto: string,\nwhen: {\n    date: string,\n    flexible?: boolean,\n    },\n}) => any;\n\n} // namespace functions<|end|>")
vec("tool_type_list_and_any", "5.4: a list of types renders as a union; an unknown type as any",
    kind="render_conversation", messages=[{"role": "developer", "content": {"tools": [{"name": "set", "description": "Sets a value.",
        "parameters": {"type": "object", "properties": {"key": {"type": "string"}, "value": {"type": ["number", "string", "integer"]}, "meta": {}},
            "required": ["key", "value"]}}]}}],
    expected_text="<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n// Sets a value.\ntype set = (_: {\nkey: string,\nvalue: number | string | number,\nmeta?: any,\n}) => any;\n\n} // namespace functions<|end|>")
vec("tool_key_order_preserved", "5.4: properties keep JSON order, not alphabetical order",
    kind="render_conversation", messages=[{"role": "developer", "content": {"tools": [{"name": "order", "description": "Orders.",
        "parameters": {"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "string"}, "mu": {"type": "number"}},
            "required": ["zeta", "alpha", "mu"]}}]}}],
    expected_text="<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n// Orders.\ntype order = (_: {\nzeta: string,\nalpha: string,\nmu: number,\n}) => any;\n\n} // namespace functions<|end|>")
vec("response_format", "5.10: a response format adds '# Response Formats', '## name', '// description' and the JSON schema",
    kind="render_conversation", messages=[{"role": "developer", "content": {"instructions": "Be brief.", "response_formats": [
        {"name": "answer", "description": "The answer and a confidence.", "schema": {"type": "object", "properties": {"text": {"type": "string"}, "p": {"type": "number"}}}}]}}],
    expected_text="<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Response Formats\n\n## answer\n\n// The answer and a confidence.\n{\"type\":\"object\",\"properties\":{\"text\":{\"type\":\"string\"},\"p\":{\"type\":\"number\"}}}<|end|>")

# ---- messages (5.2, 5.5)
vec("user_with_name", "5.2: an optional ':name' follows the role for non-tool roles",
    kind="render_conversation", messages=[{"role": "user", "name": "alice", "content": "Hello"}],
    expected_text="<|start|>user:alice<|message|>Hello<|end|>")
vec("assistant_final_history", "5.2: an assistant message renders its channel after <|channel|> and ends with <|end|>",
    kind="render_conversation", messages=[{"role": "assistant", "channel": "final", "content": "Tokyo."}],
    expected_text="<|start|>assistant<|channel|>final<|message|>Tokyo.<|end|>")
vec("assistant_code_content_type", "5.2: a content type that is not <|constrain|> renders as ' {content_type}' text; a recipient ends the message in <|call|>",
    kind="render_conversation", messages=[{"role": "assistant", "channel": "analysis", "recipient": "python", "content_type": "code", "content": "print(2**100)"}],
    expected_text="<|start|>assistant to=python<|channel|>analysis code<|message|>print(2**100)<|call|>")
vec("tool_message_plain", "5.5: a tool message without channel or recipient is <|start|>{tool name}<|message|>...<|end|>",
    kind="render_conversation", messages=[{"role": "tool", "name": "functions.lookup_weather", "content": "{\"sunny\": true}"}],
    expected_text="<|start|>functions.lookup_weather<|message|>{\"sunny\": true}<|end|>")
vec("recipient_all_is_omitted", "5.2: a recipient of 'all' is not rendered",
    kind="render_conversation", messages=[{"role": "assistant", "channel": "final", "recipient": "all", "content": "Hi all"}],
    expected_text="<|start|>assistant<|channel|>final<|message|>Hi all<|call|>")
vec("special_strings_in_user_text", "5.2: text pieces are encoded as ordinary text, so special-token strings in user content are not control tokens",
    kind="render_conversation", messages=[{"role": "user", "content": "Type <|end|> to stop."}],
    expected_text="<|start|>user<|message|>Type <|end|> to stop.<|end|>",
    expected_pieces=[{"special": "<|start|>"}, {"text": "user"}, {"special": "<|message|>"}, {"text": "Type <|end|> to stop."}, {"special": "<|end|>"}])

# ---- CoT dropping (5.6) and Example B (5.9)
EXB_SYS = SYS + "Current date: 2025-06-28\n\nReasoning: medium\n\n" + CH + CALLS + "<|end|>"
EXB_DEV = ("<|start|>developer<|message|># Instructions\n\nUse a friendly tone.\n\n# Tools\n\n## functions\n\nnamespace functions {\n\n"
           + WEATHER_TS + "\n} // namespace functions<|end|>")
vec("example_b_prompt", "5.9: Example B's prompt, exactly as the reference gives it",
    kind="render_completion", next_role="assistant", system={"date": "2025-06-28"},
    developer={"instructions": "Use a friendly tone.", "tools": [WEATHER]},
    messages=[{"role": "user", "content": "What is the weather like in SF?"}],
    expected_text=EXB_SYS + EXB_DEV + "<|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant")
vec("example_b_keeps_analysis_mid_tool_call", "5.6/5.9: mid tool call (last assistant message not final) every analysis message is kept",
    kind="render_completion", next_role="assistant", system={"date": "2025-06-28"},
    developer={"instructions": "Use a friendly tone.", "tools": [WEATHER]},
    messages=[{"role": "user", "content": "What is the weather like in SF?"},
              {"role": "assistant", "channel": "analysis", "content": "Need to use function get_current_weather."},
              {"role": "assistant", "channel": "commentary", "recipient": "functions.get_current_weather", "content_type": "<|constrain|>json", "content": "{\"location\":\"San Francisco, CA\"}"},
              {"role": "tool", "name": "functions.get_current_weather", "recipient": "assistant", "channel": "commentary", "content": "{\"sunny\": true, \"temperature\": 20}"}],
    expected_text=EXB_SYS + EXB_DEV + "<|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant<|channel|>analysis<|message|>Need to use function get_current_weather.<|end|><|start|>assistant to=functions.get_current_weather<|channel|>commentary <|constrain|>json<|message|>{\"location\":\"San Francisco, CA\"}<|call|><|start|>functions.get_current_weather to=assistant<|channel|>commentary<|message|>{\"sunny\": true, \"temperature\": 20}<|end|><|start|>assistant")
vec("keep_analysis_switch", "5.6: with the switch set, analysis before the first final message is kept",
    kind="render_completion", next_role="assistant", keep_analysis=True,
    messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "channel": "analysis", "content": "Easy."},
              {"role": "assistant", "channel": "final", "content": "4"}, {"role": "user", "content": "3+3?"}],
    expected_text="<|start|>user<|message|>2+2?<|end|><|start|>assistant<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>4<|end|><|start|>user<|message|>3+3?<|end|><|start|>assistant")
vec("drop_only_before_first_final", "5.6: only analysis before the first final message is dropped; a later turn's analysis stays",
    kind="render_completion", next_role="assistant",
    messages=[{"role": "user", "content": "a"}, {"role": "assistant", "channel": "analysis", "content": "t1"},
              {"role": "assistant", "channel": "final", "content": "A"}, {"role": "user", "content": "b"},
              {"role": "assistant", "channel": "analysis", "content": "t2"}, {"role": "assistant", "channel": "final", "content": "B"},
              {"role": "user", "content": "c"}],
    expected_text="<|start|>user<|message|>a<|end|><|start|>assistant<|channel|>final<|message|>A<|end|><|start|>user<|message|>b<|end|><|start|>assistant<|channel|>analysis<|message|>t2<|end|><|start|>assistant<|channel|>final<|message|>B<|end|><|start|>user<|message|>c<|end|><|start|>assistant")
vec("training_keeps_thinking", "5.2: the training render ends a final assistant message in <|return|>; training keeps the analysis it learns from",
    kind="render_training",
    messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "thinking": "Greet back.", "content": "hello"}],
    expected_text="<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>analysis<|message|>Greet back.<|end|><|start|>assistant<|channel|>final<|message|>hello<|return|>")
vec("prefill_final", "prefill: the assistant turn opens in the given channel, skipping the analysis",
    kind="render_completion", next_role="assistant", prefill={"channel": "final"},
    messages=[{"role": "user", "content": "Capital of Japan?"}],
    expected_text="<|start|>user<|message|>Capital of Japan?<|end|><|start|>assistant<|channel|>final<|message|>")
vec("openai_style_tool_call", "5.5/5.9: an OpenAI-style assistant tool call becomes a commentary message to=functions.NAME with <|constrain|>json; the tool result comes from functions.NAME to=assistant",
    kind="render_conversation",
    messages=[{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "thinking": "Call the tool.", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": "{\"temp\": 21}"}],
    expected_text="<|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant<|channel|>analysis<|message|>Call the tool.<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{\"city\":\"Paris\"}<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"temp\": 21}<|end|>")

# ---- parsing (5.5, 5.7, 5.8, 5.9)
vec("parse_example_b_completion", "5.9: the model writes the recipient after the channel; both parse into recipient and content type",
    kind="parse_completion", parse_role="assistant",
    completion_text="<|channel|>analysis<|message|>Need to use function get_current_weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_current_weather <|constrain|>json<|message|>{\"location\":\"San Francisco, CA\"}<|call|>",
    expected_messages=[{"role": "assistant", "channel": "analysis", "content": "Need to use function get_current_weather."},
                       {"role": "assistant", "channel": "commentary", "recipient": "functions.get_current_weather", "content_type": "<|constrain|>json", "content": "{\"location\":\"San Francisco, CA\"}"}])
vec("parse_doc_token_example", "5.8: the format doc's completion tokens parse into an analysis and a final message",
    kind="parse_completion", parse_role="assistant",
    completion_tokens=[200005, 35644, 200008, 1844, 31064, 25, 392, 4827, 382, 220, 17, 659, 220, 17, 16842, 12295, 81645, 13, 51441, 6052, 13, 200007, 200006, 173781, 200005, 17196, 200008, 17, 659, 220, 17, 314, 220, 19, 13, 200002],
    expected_messages=[{"role": "assistant", "channel": "analysis", "content": "User asks: \"What is 2 + 2?\" Simple arithmetic. Provide answer."},
                       {"role": "assistant", "channel": "final", "content": "2 + 2 = 4."}])
vec("parse_tool_result_header", "5.5/5.7: an unknown first header word with more words is a tool author name",
    kind="parse_completion", parse_role=None,
    completion_text="<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>{\"ok\":1}<|end|>",
    expected_messages=[{"role": "tool", "name": "functions.lookup", "channel": "commentary", "recipient": "assistant", "content": "{\"ok\":1}"}])
vec("parse_truncated_content", "5.7: the end of input ends an open message (a completion cut by max_tokens)",
    kind="parse_completion", parse_role="assistant",
    completion_text="<|channel|>final<|message|>The answer is",
    expected_messages=[{"role": "assistant", "channel": "final", "content": "The answer is"}])
vec("parse_lenient_plain_text", "lenient: a completion with no harmony markup becomes one assistant message",
    kind="parse_completion", parse_role=None, lenient=True,
    completion_text="Just some text, no markup.",
    expected_messages=[{"role": "assistant", "content": "Just some text, no markup."}])
vec("parse_lenient_missing_end", "lenient: a message whose <|end|> is missing ends at the next <|start|>",
    kind="parse_completion", parse_role="assistant", lenient=True,
    completion_text="<|channel|>analysis<|message|>thinking<|start|>assistant<|channel|>final<|message|>done<|return|>",
    expected_messages=[{"role": "assistant", "channel": "analysis", "content": "thinking"},
                       {"role": "assistant", "channel": "final", "content": "done"}])
vec("parse_lenient_truncated_header", "lenient: a header cut off by the end of input still gives its message",
    kind="parse_completion", parse_role="assistant", lenient=True,
    completion_text="<|channel|>final<|message|>ok<|end|><|start|>assistant<|channel|>commentary to=functions.f",
    expected_messages=[{"role": "assistant", "channel": "final", "content": "ok"},
                       {"role": "assistant", "channel": "commentary", "content": "to=functions.f"}])
vec("error_text_before_start", "5.7 ExpectStart: strict parsing requires <|start|> between messages",
    kind="error", operation="parse_completion", parse_role=None,
    completion_text="hello<|start|>assistant<|message|>x<|end|>", completion_tokens=None,
    expected_error="while expecting <|start|>")
vec("error_unknown_role", "5.7: a lone header word that is not a role is an error",
    kind="error", operation="parse_completion", parse_role=None,
    completion_text="<|start|>robot<|message|>beep<|end|>", completion_tokens=None,
    expected_error="unknown role: robot")
vec("error_tool_without_call", "5.5: a tool result needs a preceding tool call to name it",
    kind="error", operation="render", messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}],
    expected_error="a tool message with no preceding tool call")
vec("error_unknown_render_role", "5.2: roles are system, developer, user, assistant and tool",
    kind="error", operation="render", messages=[{"role": "narrator", "content": "Once upon a time"}],
    expected_error="unknown role 'narrator'")

os.makedirs(OUT, exist_ok=True)
for v in V:
    with open(os.path.join(OUT, v["name"] + ".json"), "w", encoding="utf-8") as f:
        json.dump(v, f, ensure_ascii=False, indent=1)
        f.write("\n")
print("wrote %d vectors" % len(V))
