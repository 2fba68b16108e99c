#!/usr/bin/env python3
"""Renders spec/fixtures/harmony/hf/inputs.json with the gpt-oss chat
template through jinja2, compiled exactly as transformers compiles chat
templates (its own _compile_jinja_template when importable), with
strftime_now fixed to each case's date.

    python3 tools/reference/hf_template.py TEMPLATE INPUTS OUT
"""
import json
import sys


def compile_template(src):
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        return _compile_jinja_template(src), "transformers._compile_jinja_template"
    except Exception:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        return env.from_string(src), "jinja2 with transformers' settings"


def main():
    tmpl_path, inputs, out = sys.argv[1:4]
    import jinja2
    template, how = compile_template(open(tmpl_path, encoding="utf-8").read())
    cases = json.load(open(inputs, encoding="utf-8"))
    res = {"_engine": "%s, jinja2 %s" % (how, jinja2.__version__)}
    for c in cases:
        kw = {k: c[k] for k in ("tools", "builtin_tools", "model_identity", "reasoning_effort") if k in c}
        date = c["date"]
        try:
            text = template.render(messages=c["messages"], add_generation_prompt=c["add_generation_prompt"],
                                   strftime_now=lambda fmt, d=date: __import__("datetime").datetime.strptime(d, "%Y-%m-%d").strftime(fmt),
                                   bos_token="<|startoftext|>", eos_token="<|return|>", **kw)
            res[c["name"]] = {"text": text}
        except Exception as e:
            res[c["name"]] = {"error": str(e)}
    json.dump(res, open(out, "w", encoding="utf-8"), ensure_ascii=False, indent=1)
    print("hf_template: rendered %d cases with %s" % (len(cases), res["_engine"]))


if __name__ == "__main__":
    main()
