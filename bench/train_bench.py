"""Benchmark: LoRA fine-tuning speed of the embedded SmolLM2-135M on this machine (`selfcorrect train`).

Supervised: correction-format rows like the `cct` recipe's (a question, a first answer, a correction prompt,
and the target reply as the completion), generated here, trained for a fixed number of steps with the
trainer's defaults (LoRA r 16 on the attention and MLP projections, batch 8, float32 on the CPU). The rate
is the training card's: input tokens of the training steps per second of training (loading the model and
writing the adapter are not counted).

RL (`rl` rows, train/rl.py): episode prompts of two-digit sums, at the settings of the experiment in
docs/training.md (8 questions x 8 episodes a step, at most 48 tokens an attempt, `reask`'s correction turn):
seconds per step, and the rollouts' rate, the tokens the model wrote in its two sampled turns per second of
sampling and grading them (the rest of a step is the loss's forward and backward passes).

    python bench/train_bench.py [--steps N] [--rl-steps N]

The last lines have the form `name: value`, ending with `rollout_tokens_per_s`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
import time
from pathlib import Path

from selfcorrect.split import question_key
from selfcorrect.tasks import load_task
from selfcorrect.train import rl
from selfcorrect.train.trainer import train


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def correction_rows(count: int) -> list[dict]:
    rows = []
    for n in range(count):
        a, b = 17 + 7 * n, 23 + 5 * n
        question = f"Compute {a} + {b}. End your reply with 'The answer is N.'"
        rows.append({
            "prompt": [{"role": "user", "content": question},
                       {"role": "assistant", "content": f"{a} plus {b} is {a + b + 1}. The answer is {a + b + 1}."},
                       {"role": "user", "content": "Review your previous answer and find problems with your answer. "
                                                   "Then give your final answer."}],
            "completion": [{"role": "assistant", "content": f"Adding again: {a} + {b} = {a + b}. I made an error "
                                                            f"before. The answer is {a + b}."}],
            "source": {"recipe": "cct", "part": "cst", "run": "bench", "item": str(n), "sample": 0, "round": 1,
                       "question_sha256": hashlib.sha256(question.encode()).hexdigest()},
        })
    return rows


def episode_rows(count: int) -> list[dict]:
    """Episode prompts (recipe rl) of two-digit sums, with reask's correction turn (the question again)."""
    options = {"n": "2000", "digits": "2"}
    task = load_task("arithmetic", None, options)
    rows = []
    for item in task.items[:count]:
        asked = [{"role": "user", "content": task.prompt(item)}]
        rows.append({"prompt": asked, "correction": asked, "task": {"task": "arithmetic", "data": None, "options": options},
                     "item": item.id, "target": item.target,
                     "source": {"recipe": "rl", "part": "rl", "run": "bench", "item": item.id, "sample": 0, "round": 1,
                                "question_sha256": question_key(item.question)}})
    return rows


class RolloutClock:
    """Wraps the trainer's rollout function to add up its time and the tokens the model wrote in it."""

    def __init__(self):
        self.seconds, self.tokens, self.rollout = 0.0, 0, rl.rollout

    def __call__(self, prompts, trainer):
        started = time.perf_counter()
        episode = self.rollout(prompts, trainer)
        self.seconds += time.perf_counter() - started
        self.tokens += sum(sum(mask) for mask in episode["env_mask"])
        return episode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps of 8 rows (default 8)")
    parser.add_argument("--rl-steps", type=int, default=3, help="rl steps of 64 episodes (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "rows.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in correction_rows(8 * args.steps)))
        card = train(data, "embedded", Path(folder) / "adapter", max_steps=args.steps, save_steps=args.steps)
        episodes = Path(folder) / "rl.jsonl"
        episodes.write_text("".join(json.dumps(row) + "\n" for row in episode_rows(8 * args.rl_steps)))
        clock = RolloutClock()
        rl.rollout = clock  # the trainer class reads the module's function when it is built
        rl_card = train(episodes, "embedded", Path(folder) / "rl", max_steps=args.rl_steps, save_steps=args.rl_steps,
                        batch_size=64, generations=8, attempt_tokens=48)
    print(f"cpu: {cpu_model()}")
    print(f"steps: {card['training']['steps']} of {card['hyperparameters']['batch_size']} rows")
    print(f"trained_tokens: {card['trained_tokens']}")
    print(f"seconds: {card['seconds']:.1f}")
    print(f"train_tokens_per_s: {card['tokens_per_second']:.0f}")
    print(f"rl_steps: {rl_card['training']['steps']} of 64 episodes (8 questions x 8), 48 tokens an attempt at most")
    print(f"rl_seconds_per_step: {rl_card['seconds'] / rl_card['training']['steps']:.1f}")
    print(f"rollout_share_of_step: {clock.seconds / rl_card['seconds']:.2f}")
    print(f"rollout_tokens_per_s: {clock.tokens / clock.seconds:.0f}")


if __name__ == "__main__":
    main()
