"""GGUF models run in-process by llama.cpp (llama-cpp-python), the embedded SmolLM2 among them."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from ..errors import UserError
import numpy as np

from .base import Completion, Message
from .identity import file_digest, llama_cpp_build
from .llamacpp_batch import BatchDecoder, attach_lora
from .spec import embedded_model_path as embedded_model_path  # where earlier versions imported it from


class LlamaCppBackend:
    """A GGUF model on llama.cpp. The chat template is the one stored in the GGUF file.

    Replies come from a `BatchDecoder`: up to `max_in_flight` conversations decode together, each keeping
    its KV cache between turns, so a correction turn prefills only its new message. Option scoring (the
    exact estimator, P(True)) runs on a second, single-sequence context of the same weights.
    """

    def __init__(self, path: Path, n_ctx: int = 4096, n_threads: int | None = None, max_in_flight: int = 16,
                 lora: Path | None = None):
        """`lora`: a llama.cpp LoRA adapter (GGUF) of these weights, attached to every context used."""
        if not path.is_file():
            raise UserError(f"--model llamacpp:{path}: no such file; give the path to a .gguf model")
        from llama_cpp import Llama  # heavy import, only when a llama.cpp model is really used

        # llama-cpp-python decodes on half the cores by default; on a 2-core machine all cores decode
        # about 1.7x faster (measured), so use them all.
        threads = n_threads or os.cpu_count() or 1
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, verbose=False)
        except (ValueError, RuntimeError) as err:
            raise UserError(f"--model llamacpp:{path}: llama.cpp cannot load it ({err}); is it a GGUF file?") from None
        adapter = self._load_adapter(lora, path) if lora else None
        # The weights by content (the adapter's too: runs and cached replies of different adapters never mix),
        # and the build that computes with them (see models/identity.py); the build stays last.
        adapter_digest = f":lora={file_digest(lora)}" if lora else ""
        self.identity = f"llamacpp:{path.name}:{file_digest(path)}{adapter_digest}:{llama_cpp_build()}"
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if template is None:
            raise UserError(f"--model llamacpp:{path}: the GGUF file has no chat template")
        eos = self.llm.detokenize([self.llm.token_eos()]).decode(errors="ignore")
        bos = self.llm.detokenize([self.llm.token_bos()]).decode(errors="ignore")
        self.chat_format = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self.max_in_flight = max_in_flight
        self.decoder = BatchDecoder(self.llm._model, n_slots=max_in_flight, slot_ctx=n_ctx, n_threads=threads,
                                    lora=adapter)
        self.scoring_lock = threading.Lock()  # the scoring context serves one caller at a time

    def _load_adapter(self, lora: Path, path: Path):
        """The LoRA adapter in `lora`, loaded on the model and attached to the scoring context. (Not through
        Llama(lora_path=...): llama-cpp-python 0.3.36 misses a failed load there, a NULL pointer that is not
        None, and runs without the adapter.)"""
        import llama_cpp

        adapter = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(lora).encode())
        if not adapter:
            raise UserError(f"{lora}: llama.cpp cannot load it as a LoRA adapter of {path.name}; export it again "
                            "from the PEFT adapter beside it")
        attach_lora(self.llm.ctx, adapter)
        return adapter  # freed with the model

    def _render(self, messages: list[Message]) -> str:
        return self.chat_format(messages=messages).prompt

    def _tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def _prompt_tokens(self, messages: list[Message], answer_prefix: str = "") -> list[int]:
        return self._tokenize(self._render(messages) + answer_prefix)

    def _reply_mask(self, messages: list[Message], rendered: str, prompt: list[int]) -> list[bool]:
        """Which tokens of `prompt` (`rendered`, tokenized) lie inside an earlier assistant reply (the decoder
        computes those one per call, as they were generated). Found by rendering the conversation with a
        marker in place of each reply; a template that does not copy replies verbatim gets no marks, which
        costs speed, not results."""
        replies = {f"\ue000{i}\ue001": m["content"] for i, m in enumerate(messages) if m["role"] == "assistant"}
        marked = [dict(m, content=f"\ue000{i}\ue001") if m["role"] == "assistant" else m for i, m in enumerate(messages)]
        spans, text = [], b""
        for part in re.split("(\ue000\\d+\ue001)", self._render(marked)):
            if part in replies:
                part = replies[part]
                spans.append((len(text), len(text) + len(part.encode())))
            text += part.encode()
        sizes = np.array([len(self.llm.detokenize([token], special=True)) for token in prompt], dtype=np.int64)
        ends = np.cumsum(sizes)
        if text != rendered.encode() or (len(ends) and ends[-1] != len(text)):
            return [False] * len(prompt)
        starts = ends - sizes
        return [any(a <= start and end <= b for a, b in spans) for start, end in zip(starts, ends)]

    def complete(self, messages: list[Message], max_tokens: int, temperature: float, seed: int) -> Completion:
        rendered = self._render(messages)
        prompt = self._tokenize(rendered)
        replay = self._reply_mask(messages, rendered, prompt)
        generated, finish_reason = self.decoder.submit(prompt, replay, max_tokens, temperature, seed).result()
        return Completion(
            text=self.llm.detokenize(generated).decode("utf-8", errors="ignore"),
            prompt_tokens=len(prompt),
            completion_tokens=len(generated),
            finish_reason=finish_reason,
        )

    def option_probs(self, messages: list[Message], answer_prefix: str, labels: list[str]) -> list[float]:
        """P(label | conversation, assistant reply so far = answer_prefix), renormalised over `labels`.

        One forward pass: the conversation is formatted with the model's chat template, the assistant's
        reply is started with `answer_prefix` ("The answer is"), and the next-token distribution is read
        at the first token of each " label". This is what the exact multiple-choice estimator needs.
        """
        tokens = self._prompt_tokens(messages, answer_prefix)
        label_tokens = [self.llm.tokenize(f" {label}".encode(), add_bos=False, special=False)[0] for label in labels]
        if len(set(label_tokens)) != len(labels):
            raise UserError(f"--estimator exact: the option labels {labels} do not start with distinct tokens")
        import llama_cpp

        with self.scoring_lock:
            self._eval_reusing_prefix(tokens)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
            chosen = logits[label_tokens].astype(np.float64)  # a copy: the buffer is the context's
        weights = np.exp(chosen - chosen.max())
        return (weights / weights.sum()).tolist()

    def count_tokens(self, messages: list[Message], answer_prefix: str = "") -> int:
        """Tokens of the prompt `option_probs` would evaluate: what a scoring pass costs."""
        return len(self._prompt_tokens(messages, answer_prefix))

    def _eval_reusing_prefix(self, tokens: list[int]) -> None:
        """Evaluate `tokens`, keeping the KV cache of the prefix shared with what was evaluated last
        (as llama-cpp-python's own generate() does), so scoring K continuations of one conversation
        prefills the shared part once."""
        shared = 0
        for old, new in zip(self.llm.input_ids[: self.llm.n_tokens], tokens[:-1]):
            if old != new:
                break
            shared += 1
        self.llm.n_tokens = shared
        self.llm.eval(tokens[shared:])
