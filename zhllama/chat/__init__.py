"""The chat layer every stage shares: prompt templates, rendering, where an answer stops, fitting a conversation.

It sits beside the core (not in a stage) because training (sft), evaluation, deployment and the benchmarks all
render the same prompts; a stage imports it, never the other way round.

    zhllama.chat.messages  check_messages, ROLES: the one shape of a conversation
    zhllama.chat.template  Template: text rendering and its Jinja twin (chat_template.jinja, GGUF chat_template)
    zhllama.chat.registry  REGISTRY, get, DEFAULT: the named templates, byte-exact copies of their sources
    zhllama.chat.record    save_name, load_name, TEMPLATE_FILE, JINJA_FILE: the template recorded with a model folder
    zhllama.chat.stops     StopText (stop strings in streamed text), StopWhen (end generation on a flag)
    zhllama.chat.context   fit_prompt, TooLong: a conversation and its answer budget within the model's context
"""
from zhllama.chat.messages import ROLES, check_messages
from zhllama.chat.record import JINJA_FILE, TEMPLATE_FILE, load_name, save_name
from zhllama.chat.registry import DEFAULT, REGISTRY, get
from zhllama.chat.template import Template

__all__ = ["DEFAULT", "JINJA_FILE", "REGISTRY", "ROLES", "TEMPLATE_FILE", "Template", "check_messages", "get",
           "load_name", "save_name"]
