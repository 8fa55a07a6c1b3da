"""Benchmark: the plain transformers loop of the paper's reference code against selfcorrect's backends.

Workload: the first arithmetic prompts, greedy, on the embedded SmolLM2-135M GGUF. Three ways through
them in one run on this machine:

- `naive_generate_loop`: what the reference code does on a CPU, `model.generate` one prompt at a time
  (the GGUF dequantised to float32 by transformers), torch imported plainly, with its default OpenMP
  settings;
- selfcorrect's `hf:` backend, all prompts in one padded `generate` call (`complete_batch`);
- selfcorrect's `embedded` backend, llama.cpp on the Q4_1 weights, one prompt at a time.

    python bench/naive_hf.py [--prompts N] [--max-tokens N] [--threads N]

`--threads 1` puts both engines on one core: on a machine shared with other work, torch's OpenMP
threads wait for each other at every operation and its rates swing tenfold from run to run.

The last lines have the form `name: value`; the ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from selfcorrect.models import Message, load_model
from selfcorrect.models.hf import Request
from selfcorrect.models.llamacpp import LlamaCppBackend
from selfcorrect.models.spec import embedded_model_path
from selfcorrect.tasks import load_task


def naive_generate_loop(gguf_path: Path, conversations: list[list[Message]], max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds of generation) of a plain greedy `generate` loop, one prompt at a time.
    Loading and one warm-up call (first-call allocations) are not timed. Where torch is not imported yet,
    transformers imports it with torch's default OpenMP settings, as the reference code does: on an idle
    machine they generate about 10% faster than the passive threads the hf backend asks for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    def generate(messages: list[Message], max_new_tokens: int) -> int:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = output[0, inputs["input_ids"].shape[1]:].tolist()
        return len(new) - (new[-1] == model.generation_config.eos_token_id)  # the stop token is no output

    generate(conversations[0], 8)
    started = time.perf_counter()
    tokens = sum(generate(messages, max_tokens) for messages in conversations)
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: every core")
    args = parser.parse_args()
    import torch  # plainly, as the reference code does (the hf backend then finds it imported)

    torch.set_num_threads(args.threads)

    task = load_task("arithmetic", None)
    conversations = [[{"role": "user", "content": task.prompt(item)}] for item in task.items[: args.prompts]]
    gguf = embedded_model_path()

    naive_tokens, naive_s = naive_generate_loop(gguf, conversations, args.max_tokens)

    hf = load_model(f"hf:{gguf}")
    hf.complete(conversations[0], 8, 0.0, 0)  # warm up, as the other two
    started = time.perf_counter()
    batch = hf.complete_batch([Request(messages, args.max_tokens, 0.0, 0) for messages in conversations])
    batch_s = time.perf_counter() - started
    batch_tokens = sum(c.completion_tokens for c in batch)

    llama = LlamaCppBackend(gguf, n_threads=args.threads)
    llama.complete([{"role": "user", "content": "Hello"}], 8, 0.0, 0)  # warm up: first-call allocations
    started = time.perf_counter()
    llama_tokens = sum(llama.complete(messages, args.max_tokens, 0.0, 0).completion_tokens for messages in conversations)
    llama_s = time.perf_counter() - started

    naive_rate, batch_rate, llama_rate = naive_tokens / naive_s, batch_tokens / batch_s, llama_tokens / llama_s
    print(f"workload: {args.prompts} arithmetic prompts, greedy, embedded SmolLM2-135M (GGUF Q4_1), {args.threads} threads")
    print(f"naive_hf_completion_tokens: {naive_tokens}")
    print(f"hf_batch_completion_tokens: {batch_tokens}")
    print(f"llamacpp_completion_tokens: {llama_tokens}")
    print(f"naive_hf_tokens_per_s: {naive_rate:.1f}")
    print(f"hf_batch_tokens_per_s: {batch_rate:.1f}")
    print(f"llamacpp_tokens_per_s: {llama_rate:.1f}")
    print(f"hf_batch_vs_naive_hf: {batch_rate / naive_rate:.2f}")
    print(f"llamacpp_vs_naive_hf: {llama_rate / naive_rate:.2f}")


if __name__ == "__main__":
    main()
