"""llama-cpp-python's OpenAI-compatible server, taught to continue a final assistant message the way vLLM does
with `continue_final_message` and llama.cpp's llama-server does by default: the conversation before it is
rendered with the model's chat template and the generation prompt, and the message's text follows, left open.
Everything else (the HTTP API, log-probabilities, sampling) is llama-cpp-python's own server, unchanged.

    python tests/continuing_server.py MODEL.gguf PORT ALIAS
"""

from __future__ import annotations

import dataclasses
import sys

import uvicorn
from llama_cpp.llama_chat_format import (
    Jinja2ChatFormatter, chat_formatter_to_chat_completion_handler, register_chat_completion_handler,
)
from llama_cpp.server.app import create_app
from llama_cpp.server.settings import ModelSettings, ServerSettings

HANDLER = "continue-final-message"


@register_chat_completion_handler(HANDLER)
def continuing_handler(*, llama, messages, **request):
    eos = llama.detokenize([llama.token_eos()]).decode(errors="ignore")
    bos = llama.detokenize([llama.token_bos()]).decode(errors="ignore")
    template = Jinja2ChatFormatter(llama.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos,
                                   stop_token_ids=[llama.token_eos()])
    formatter = template
    if messages and messages[-1]["role"] == "assistant":
        opened = template(messages=messages[:-1])
        started = dataclasses.replace(opened, prompt=opened.prompt + messages[-1]["content"])
        formatter = lambda **ignored: started  # noqa: E731  (a ChatFormatter is any callable of this shape)
    return chat_formatter_to_chat_completion_handler(formatter)(llama=llama, messages=messages, **request)


if __name__ == "__main__":
    model, port, alias = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    app = create_app(
        server_settings=ServerSettings(host="127.0.0.1", port=port),
        model_settings=[ModelSettings(model=model, model_alias=alias, chat_format=HANDLER, n_ctx=4096, n_threads=1,
                                      verbose=False)],
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
