"""Tools through a model's own tool-aware chat template (``template: auto``).

When the tokenizer's Jinja chat template reads ``tools`` and writes assistant calls in a format we
recognise (``constrain.detect_call_format``: Hermes/Qwen ``<tool_call>`` blocks, Llama-3.1 bare
JSON), a chat request with tools -- or with calls and results in its history -- is rendered by that
template: the tool list goes in as ``apply_chat_template(tools=...)``, history calls and ``tool``
results in transformers' tool-use message shapes, and no tool prompt of ours is added. The reply
is then constrained to, and parsed in, the template's call format. Every other template (alpaca,
vicuna-chat, a chat template without tools or with a call format we do not recognise) gets our
own tool prompt (``schemas.to_conversation``). Both backends build prompts here, so llama.cpp is
fed the same text as the HF model.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import replace

from ..data.templates import ChatTemplate, TemplateError
from ..generation.constrain import CallFormat, Constraint, detect_call_format
from .schemas import APIError, ChatMessage, ChatRequest, call_arguments, check_tool_reply, content_text

log = logging.getLogger(__name__)

_FORMATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def native_format(template) -> CallFormat | None:
    """The call format of ``template`` when it is a tool-aware chat template we can serve natively.

    Detected once per template (a few small renders); an unrecognised format is logged once.
    """
    if not isinstance(template, ChatTemplate):
        return None
    with _LOCK:
        if template in _FORMATS:
            return _FORMATS[template]
        fmt = None
        if template.supports_tools():
            fmt = detect_call_format(template.render_tools, template.terminator or template.eos)
            if fmt is None:
                log.warning("the model's chat template supports tools, but its tool-call format is not one this "
                            "server recognises (<tool_call> blocks, Llama-3.1 JSON): tools use our own tool prompt")
            else:
                log.info("tools are rendered by the model's chat template; calls are written as %s",
                         fmt.write("NAME", {"...": "..."}))
        _FORMATS[template] = fmt
        return fmt


def wants_native(req: ChatRequest) -> bool:
    """A request that involves tools: tool definitions, or calls / results in its history."""
    return bool(req.tools) or any(m.tool_calls or m.role == "tool" for m in req.messages)


def native_messages(messages: list[ChatMessage], fmt: CallFormat,
                    default_system: str | None = None) -> tuple[list[dict], str]:
    """OpenAI messages -> (messages in transformers' tool-use shapes, the assistant prefill).

    As for our own prompt: leading system/developer messages are joined into one system message
    (``default_system`` if none); a later one joins the next user turn; consecutive user or
    assistant messages are merged; a ``tool`` message must answer an earlier call, and gets that
    call's function name. A last assistant message is a prefill that the reply continues.
    """
    system: list[str] = []
    out: list[dict] = []
    names: dict[str, str] = {}
    for i, m in enumerate(messages):
        text = content_text(m.content, i)
        if m.role == "tool":
            check_tool_reply(m, i, names)
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "name": names[m.tool_call_id],
                        "content": text})
            continue
        if m.role == "assistant":
            calls = [{"type": "function", "id": call.id, "function": {"name": call.function.name, "arguments": args}}
                     for call, args in call_arguments(m, i)]
            names.update((c["id"], c["function"]["name"]) for c in calls)
            if out and out[-1]["role"] == "assistant":
                last = out[-1]
                last["content"] = "\n\n".join(t for t in (last["content"], text) if t)
                if calls:
                    last["tool_calls"] = last.get("tool_calls", []) + calls
            else:
                out.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
            continue
        if m.role in ("system", "developer") and not out:
            system.append(text)
            continue
        if out and out[-1]["role"] == "user":
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": "user", "content": text})
    if not out or out[0]["role"] != "user":
        raise APIError(400, "The first non-system message must be from the user.", param="messages")
    prefill = ""
    if out[-1]["role"] == "assistant":
        last = out.pop()
        calls = [fmt.write(c["function"]["name"], c["function"]["arguments"]) for c in last.get("tool_calls", [])]
        prefill = "\n".join(([last["content"]] if last["content"] else []) + calls)
    head = "\n\n".join(system) if system else default_system
    return ([{"role": "system", "content": head}] if head else []) + out, prefill


def tool_schemas(req: ChatRequest) -> list[dict] | None:
    """The request's tools as chat templates read them (none when ``tool_choice`` is ``none``)."""
    if not req.tools or req.tool_choice == "none":
        return None
    return [{"type": "function", "function": {"name": t.function.name, "description": t.function.description,
                                              "parameters": t.function.parameters or {"type": "object", "properties": {}}}}
            for t in req.tools]


def native_prompt(engine, req: ChatRequest, fmt: CallFormat,
                  cons: Constraint | None) -> tuple[list[int], str, Constraint | None]:
    """Prompt ids, prefill and constraint (in the template's call format) of a tool request."""
    tmpl: ChatTemplate = engine.template
    msgs, prefill = native_messages(req.messages, fmt, tmpl.system_prompt)
    try:
        text = tmpl.render_tools(msgs, tool_schemas(req), True)
    except TemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    # The template writes its own BOS where it wants one; the prompt and prefill are one string.
    ids = engine.renderer().encode(text + prefill)
    if cons is not None and cons.kind == "tools":
        cons = replace(cons, format=fmt)
    return ids, prefill, cons
