#!/usr/bin/env python3
"""Writes spec/fixtures/harmony/hf/inputs.json: conversations for the hf
flavour, in the inputs the Hugging Face chat template takes (messages,
tools, builtin_tools, model_identity, reasoning_effort,
add_generation_prompt) plus the date strftime_now returns. The expected
renderings come from a real Jinja engine (tools/reference/hf_template.py
with jinja2 on the device; tools/harmony/hf_render.mjs with
@huggingface/jinja here)."""
import json, sys

W = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city.",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string", "description": "City name"},
         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
         "required": ["city"]}}}
RICH = {"type": "function", "function": {"name": "plan_trip", "description": "Plans a trip.",
        "parameters": {"type": "object", "properties": {
            "destination": {"type": "string", "description": "Where to go", "default": "Lisbon"},
            "days": {"type": "integer", "default": 3},
            "budget": {"type": "number", "nullable": True},
            "tags": {"type": "array", "items": {"type": "string"}},
            "stops": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "nights": {"type": "integer"}}}},
            "scores": {"type": "array", "items": {"type": "number"}, "nullable": True},
            "flags": {"type": "array"},
            "travellers": {"type": "object", "properties": {"adults": {"type": "integer"}, "children": {"type": "integer"}}, "required": ["adults"]},
            "mode": {"oneOf": [{"type": "string", "description": "a named mode"}, {"type": "number", "default": 1}], "default": "auto"},
            "note": {"type": ["string", "null"]},
            "misc": {"type": "object"},
            "anything": {}},
            "required": ["destination", "days"]}}}
PING = {"type": "function", "function": {"name": "ping", "description": "Checks the service."}}
UNI = {"type": "function", "function": {"name": "traduire", "description": "Traduit un texte — vers le français.",
       "parameters": {"type": "object", "properties": {"texte": {"type": "string", "default": "Bonjour à tous"},
                      "registre": {"type": "string", "enum": ["soutenu", "familier"], "default": "soutenu"}}}}}
OBJ_ONEOF = {"type": "function", "function": {"name": "store", "description": "Stores a value.",
             "parameters": {"type": "object", "properties": {
                 "value": {"oneOf": [{"type": "object", "properties": {"k": {"type": "string"}}}, {"type": "string"}]},
                 "ttl": {"oneOf": [{"type": "integer"}, {"type": "null"}], "description": "seconds"}}}}}

C = []
def case(name, **kw):
    d = {"name": name, "date": "2026-11-22", "add_generation_prompt": True}
    d.update(kw)
    C.append(d)

case("user_only", messages=[{"role": "user", "content": "Hello!"}])
case("developer_instructions", messages=[{"role": "developer", "content": "Answer like a pirate."}, {"role": "user", "content": "Hi"}])
case("system_role_as_instructions", messages=[{"role": "system", "content": "Be concise."}, {"role": "user", "content": "What is AI?"}], reasoning_effort="low")
case("multi_turn_drops_thinking", messages=[
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "thinking": "Simple.", "content": "4"},
    {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "thinking": "Also simple.", "content": "6"},
    {"role": "user", "content": "Thanks"}], reasoning_effort="high")
case("training_last_turn_thinking", add_generation_prompt=False, messages=[
    {"role": "user", "content": "Translate 'chat' to English."},
    {"role": "assistant", "thinking": "French chat means cat.", "content": "Cat."}])
case("training_multi_turn", add_generation_prompt=False, messages=[
    {"role": "developer", "content": "You speak German."},
    {"role": "user", "content": "Hallo"}, {"role": "assistant", "thinking": "greet", "content": "Hallo!"},
    {"role": "user", "content": "Wie geht's?"}, {"role": "assistant", "thinking": "answer politely", "content": "Gut, danke."}])
case("tool_definitions", tools=[W, PING], messages=[{"role": "user", "content": "Weather in Oslo?"}])
case("rich_schema", tools=[RICH], messages=[{"role": "user", "content": "Plan something."}])
case("tool_call_then_result", tools=[W], messages=[
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "thinking": "I should call get_weather.", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "{\"temperature\": -3, \"sky\": \"snow\"}"}])
case("tool_call_result_and_answer", tools=[W], messages=[
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "Calling the tool.", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
    {"role": "tool", "content": "-3 and snowing"},
    {"role": "assistant", "content": "It is -3°C and snowing in Oslo."},
    {"role": "user", "content": "And Rome?"}])
case("tool_call_string_arguments", tools=[W], messages=[
    {"role": "user", "content": "Weather in Rome?"},
    {"role": "assistant", "thinking": "call", "tool_calls": [{"function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
    {"role": "tool", "content": "sunny"}])
case("two_tool_calls", tools=[W, PING], messages=[
    {"role": "user", "content": "Check the service, then Oslo."},
    {"role": "assistant", "thinking": "ping first", "tool_calls": [{"function": {"name": "ping", "arguments": {}}}]},
    {"role": "tool", "content": "ok"},
    {"role": "assistant", "thinking": "now weather", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "cold"}])
case("builtin_browser", builtin_tools=["browser"], messages=[{"role": "user", "content": "Search the news."}])
case("builtin_browser_python_and_functions", builtin_tools=["browser", "python"], tools=[W], model_identity="You are a research assistant.",
     messages=[{"role": "developer", "content": "Cite sources."}, {"role": "user", "content": "Research Oslo weather."}])
case("unicode_and_defaults", tools=[UNI], messages=[{"role": "user", "content": "Traduis « chat » s'il te plaît — merci 🙏"}])
case("oneof_object_variant", tools=[OBJ_ONEOF], messages=[{"role": "user", "content": "Store it."}])
case("no_generation_prompt_user_last", add_generation_prompt=False, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}])
case("tool_call_content_type", tools=[W], messages=[
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "thinking": "call it", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Lima"}, "content_type": "code"}}]},
    {"role": "tool", "content": "warm"}])

json.dump(C, open(sys.argv[1] if len(sys.argv) > 1 else "spec/fixtures/harmony/hf/inputs.json", "w"), ensure_ascii=False, indent=1)
print("wrote %d cases" % len(C))
