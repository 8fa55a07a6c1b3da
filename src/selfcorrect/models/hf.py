"""Models run by Hugging Face transformers on PyTorch: `hf:DIR_OR_HUB_ID`, or `hf:FILE.gguf` (a GGUF file,
dequantised to float32 by transformers), or `hf:ADAPTER_DIR` (a PEFT LoRA adapter on its base, which the
directory's training_card.json or adapter_config.json names). Batched greedy generation and option
log-probabilities.

Needs the `hf` extra; torch and transformers are imported only when such a model is loaded.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .base import Completion, Message
from .identity import file_digest, files_digest
from .spec import adapter_base
from .trained import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE

INSTALL_HINT = "needs the hf extra: pip install 'selfcorrect[hf]' (install torch==2.13.0 first for the CPU build)"
TRAIN_INSTALL_HINT = "needs the train extra: pip install 'selfcorrect[train]' (install torch==2.13.0 first for the CPU build)"

# Sampling at T > 0 truncates the distribution as llama-cpp-python does by default, so that switching a
# model from llama.cpp to transformers does not change the sampling protocol.
TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05
# Conversations the engine keeps in flight on this backend; their greedy turns are generated together.
MAX_IN_FLIGHT = 8


def import_torch():
    """torch, imported with its OpenMP threads told to sleep rather than spin while they wait for each
    other. On a machine that runs other work too, a spinning thread holds the core its partner needs, and
    every operation waits for a descheduled thread: on 2 shared cores (load 4-6) greedy generation ran at
    0.8-1.8 tokens/s spinning, 6.9-8.4 passive. The variable is removed again after the import, so that
    processes started later (Ray workers, llama.cpp in them) do not inherit it: llama.cpp decodes a third
    slower passive. A user's own setting wins."""
    ours = "OMP_WAIT_POLICY" not in os.environ
    if ours:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import torch
    finally:
        if ours:
            del os.environ["OMP_WAIT_POLICY"]
    return torch


def locate(source: str) -> tuple[str, dict, str | None]:
    """Where transformers loads `source` (a directory, a .gguf file or a Hub id) from, with which options, and
    its weights' identity (`hf:NAME:DIGEST`; None for a Hub id, known only once loaded)."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"--model hf:{source}: no such file; give the path to a .gguf model")
        return str(path.parent), {"gguf_file": path.name}, f"hf:{path.name}:{file_digest(path)}"
    if path.is_dir():
        # Every file of the directory: weights, and the config and tokenizer (its chat template) too.
        return str(path), {}, f"hf:{path.name}:{files_digest([f for f in path.iterdir() if f.is_file()])}"
    return source, {}, None


def load_pretrained(source: str, dtype, label: str):
    """(model, tokenizer, weights identity) of `source` as `locate` finds it, with dense weights in `dtype`.

    Loaded once per process and dtype, and kept: dequantising the embedded GGUF takes about 20 s on 2 cores,
    and a process often loads one base several times (the closed loop trains several adapters of it, a
    trained model runs on its base). The model is shared: copy it before changing it (training, merging an
    adapter). The tokenizer is the caller's own copy. `label` names the model in errors (`--model SPEC`)."""
    location, options, weights = locate(source)
    try:
        model, tokenizer = _pretrained(location, tuple(options.items()), str(dtype), weights)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{label}: transformers cannot load it ({reason})") from None
    if tokenizer.chat_template is None:
        raise UserError(f"{label}: the tokenizer has no chat template; use an instruction-tuned model")
    if weights is None:  # a Hub id: named by the revision it resolved to
        weights = f"hf:{source}@{model.config._commit_hash or 'unknown-revision'}"
    return model, copy.deepcopy(tokenizer), weights


_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> the lock its users take
_LOCKS_GUARD = threading.Lock()


def _lock_of(model) -> threading.Lock:
    """The one lock of a model object, for every backend that runs it (generation is not thread-safe)."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.Lock())


@functools.lru_cache(maxsize=2)  # a base and, say, a small draft or test model beside it
def _pretrained(location: str, options: tuple, dtype_name: str, weights: str | None):
    """`load_pretrained`'s load, keyed by the weights' identity too, so that a file changed on disk is loaded
    again. A GGUF file is dequantised explicitly: transformers would otherwise keep its blocks packed where an
    optional kernels package is installed, and a reply must not depend on that."""
    torch = import_torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    options = dict(options)
    tokenizer = AutoTokenizer.from_pretrained(location, **options)
    if "gguf_file" in options:
        options["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype_name.removeprefix("torch.")),
                                                 **options)
    return model, tokenizer


@dataclass(frozen=True)
class Request:
    """One conversation to complete, with the arguments of `Backend.complete`."""

    messages: list[Message]
    max_tokens: int
    temperature: float
    seed: int


class TransformersBackend:
    """A causal language model and its tokenizer, with the tokenizer's chat template.

    `complete_batch` generates the greedy requests of a batch in one padded `generate` call (left padding
    with an attention mask, so every row continues its own prompt). Requests with temperature > 0 are
    generated one at a time after `torch.manual_seed(seed)`: one call shares one random stream between
    its rows, so batching them would make a reply depend on its batch neighbours and break the response
    cache's promise that the same seed gives the same reply. One lock serialises all use of the model, also by
    another backend of the same base in this process (`load_pretrained` shares one model between them).

    `complete`, called by the engine from up to `max_in_flight` threads at once, gathers its callers into
    such batches: while one caller generates a batch, the callers that arrive wait, and when it is done one
    of them generates all their requests at once. Padding is not promised to leave greedy replies unchanged
    (transformers computes a padded batch with other matrix shapes), though in our tests it did.
    """

    def __init__(self, source: str):
        try:
            torch = import_torch()
            import transformers
        except ImportError:
            raise UserError(f"--model hf:{source}: {INSTALL_HINT}") from None
        self.torch = torch
        path = Path(source).expanduser()
        # A PEFT adapter directory (what selfcorrect train writes): its base is loaded, then the adapter.
        adapter = path if (path / PEFT_CONFIG_FILE).is_file() else None
        if adapter:
            try:
                import peft  # noqa: F401  (known missing before the base is loaded, not after)
            except ImportError:
                raise UserError(f"--model hf:{source}: a LoRA adapter {TRAIN_INSTALL_HINT}") from None
        if adapter and not (adapter / PEFT_WEIGHTS_FILE).is_file():
            raise UserError(f"--model hf:{source}: {adapter / PEFT_WEIGHTS_FILE} is missing; the adapter was not saved whole")
        base = adapter_base(path) if adapter else source
        self.model, self.tokenizer, weights = load_pretrained(base, torch.float32, f"--model hf:{base}")
        # The weights by content (see models/identity.py), the adapter's too, and the libraries that compute
        # with them.
        build = f"torch-{torch.__version__}:transformers-{transformers.__version__}"
        adapter_digest = f":lora={files_digest([adapter / PEFT_CONFIG_FILE, adapter / PEFT_WEIGHTS_FILE])}" if adapter else ""
        self.identity = f"{weights}{adapter_digest}:{build}"
        if adapter:
            self.model = self._with_adapter(adapter)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.stop_tokens = set(eos) if isinstance(eos, list) else {eos}
        self.tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token_id = min(self.stop_tokens)
        self.lock = _lock_of(self.model)  # held by whoever runs the model, whichever backend shares it
        self.waiting: list[tuple[Request, Future]] = []  # `complete` calls not yet taken into a batch
        self.gathering = threading.Condition()  # guards `waiting` and `leading`
        self.leading = False  # a caller is generating a batch of `complete` calls
        self.max_in_flight = MAX_IN_FLIGHT

    def _with_adapter(self, adapter: Path):
        """The model with the PEFT adapter in `adapter` merged into a copy of its weights (as fast as the base;
        the base stays as loaded, for others in this process)."""
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(copy.deepcopy(self.model), str(adapter)).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--model hf:{adapter}: peft cannot attach the adapter to its base ({reason})") from None

    def complete(self, messages: list[Message], max_tokens: int, temperature: float, seed: int) -> Completion:
        mine: Future = Future()
        with self.gathering:
            self.waiting.append((Request(messages, max_tokens, temperature, seed), mine))
            self.gathering.wait_for(lambda: mine.done() or not self.leading)
            if mine.done():  # a batch led by another caller held it
                return mine.result()
            self.leading = True
            taken, self.waiting = self.waiting, []
        try:
            with self.lock:
                replies = self._complete_all([request for request, _ in taken])
        except BaseException as error:
            for _, future in taken:
                future.set_exception(error)
        else:
            for (_, future), reply in zip(taken, replies):
                future.set_result(reply)
        finally:
            with self.gathering:
                self.leading = False
                self.gathering.notify_all()
        return mine.result()

    def complete_batch(self, requests: list[Request]) -> list[Completion]:
        """One completion per request, in order; the greedy ones are generated together."""
        with self.lock:
            return self._complete_all(requests)

    def _complete_all(self, requests: list[Request]) -> list[Completion]:
        """`complete_batch`, with the model's lock held."""
        replies: dict[int, Completion] = {}
        greedy = [i for i, r in enumerate(requests) if r.temperature == 0]
        if greedy:
            replies.update(zip(greedy, self._generate([requests[i] for i in greedy])))
        for i, request in enumerate(requests):
            if request.temperature != 0:
                self.torch.manual_seed(request.seed)
                replies[i] = self._generate([request])[0]
        return [replies[i] for i in range(len(requests))]

    def _generate(self, requests: list[Request]) -> list[Completion]:
        """One `generate` call for `requests`, all greedy or a single sampled one."""
        prompts = [self._chat_prompt(r.messages) for r in requests]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        temperature = requests[0].temperature
        sampling = {"do_sample": True, "temperature": temperature, "top_k": TOP_K, "top_p": TOP_P, "min_p": MIN_P}
        output = self.model.generate(
            **batch, max_new_tokens=max(r.max_tokens for r in requests), pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.stop_tokens), **(sampling if temperature else {"do_sample": False}),
        )
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
        completions = []
        for request, tokens, mask in zip(requests, new_tokens, batch["attention_mask"]):
            # A row that stopped early is padded to the longest; one with a smaller budget than the
            # batch's is cut to its own (greedy decoding of a prefix does not depend on the budget).
            tokens = tokens[: request.max_tokens]
            length = next((n for n, token in enumerate(tokens) if token in self.stop_tokens), len(tokens))
            completions.append(Completion(
                text=self.tokenizer.decode(tokens[:length], skip_special_tokens=True),
                prompt_tokens=int(mask.sum()),
                completion_tokens=length,
                finish_reason="stop" if length < len(tokens) else "length",
            ))
        return completions

    def option_probs(self, messages: list[Message], answer_prefix: str, labels: list[str]) -> list[float]:
        """P(label | conversation, assistant reply so far = answer_prefix), renormalised over `labels`, as
        `LlamaCppBackend.option_probs` defines it: one forward pass over the chat-templated conversation
        followed by `answer_prefix`, read at the first token of each " label"."""
        label_tokens = [self.tokenizer.encode(f" {label}", add_special_tokens=False)[0] for label in labels]
        if len(set(label_tokens)) != len(labels):
            raise UserError(f"--estimator exact: the option labels {labels} do not start with distinct tokens")
        tokens = self._scoring_tokens(messages, answer_prefix)
        with self.lock, self.torch.inference_mode():
            logits = self.model(**tokens).logits[0, -1]
        return self.torch.softmax(logits[label_tokens].double(), dim=0).tolist()

    def count_tokens(self, messages: list[Message], answer_prefix: str = "") -> int:
        """Tokens of the prompt `option_probs` would evaluate: what a scoring pass costs."""
        return self._scoring_tokens(messages, answer_prefix)["input_ids"].shape[1]

    def _scoring_tokens(self, messages: list[Message], answer_prefix: str):
        return self.tokenizer(self._chat_prompt(messages) + answer_prefix, return_tensors="pt", add_special_tokens=False)

    def _chat_prompt(self, messages: list[Message]) -> str:
        # The template writes any BOS token itself, hence add_special_tokens=False wherever this is tokenized.
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
