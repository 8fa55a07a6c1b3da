"""On-policy correction RL: SCoRe's second stage (Kumar et al., 2024, "Training Language Models to Self-Correct
via Reinforcement Learning") on TRL's GRPOTrainer, for the episode rows of recipe `rl` (train/data.py).

An episode is a correction conversation the model being trained writes itself: the question, attempt 1, the
strategy's fixed correction turn, attempt 2. A step samples `generations` episodes of each of its questions, with
one batched, sampled `generate` per turn over every episode of the step (`rollout`), and grades both attempts
with the task's own grader in grading processes, model-written code inside the sandbox (r1, r2: 1 right, 0
wrong). The correction turn's tokens carry no loss (TRL's `env_mask`), and the advantages are per token:
attempt 1's tokens get r1, attempt 2's get r2 + alpha * (r2 - r1), each normalised within the group of episodes
of one question. A reward for the whole episode would pay a deliberately wrong first attempt, since it makes the
improvement bonus possible; here attempt 1 earns only for being right.

The reference of the KL penalty (`--kl`, 0 by default as in TRL) is the base, or the adapter training starts from
(`--init`): TRL copies it as a frozen "ref" adapter.
"""

from __future__ import annotations

import functools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..api import task_from_spec
from ..errors import UserError
from ..grader_pool import GraderPool
from ..tasks import Item, Task

# Episode rewards an attempt gets: right, wrong.
RIGHT, WRONG = 1.0, 0.0
# Most episodes in one forward and backward pass of the loss; a step's episodes go through it in parts of this size,
# their gradients added up (TRL's gradient accumulation, which normalises the loss over the whole step). On the CPU
# the activations of 64 episodes of the embedded model at once took 20 GB.
LOSS_EPISODES = 16


@dataclass(frozen=True)
class Episodes:
    """The tasks and items that episode rows name, loaded again as their runs loaded them, for the rewards."""

    tasks: dict[str, Task]  # by the row's task spec, as JSON (`task_key`)
    items: dict[tuple[str, str], Item]  # (task key, item id) -> item


def task_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def load_episodes(rows: list[dict], where: Path) -> Episodes:
    """Load every task the rows name, and find each row's item with the target the row says; UserError naming
    the file and item otherwise (a data file changed since the run, a task not installed here)."""
    tasks: dict[str, Task] = {}
    items: dict[tuple[str, str], Item] = {}
    for row in rows:
        key = task_key(row["task"])
        if key not in tasks:
            try:
                tasks[key] = task_from_spec(row["task"])
            except UserError as problem:
                raise UserError(f"{where}: item {row['item']}: its task cannot be loaded: {problem}") from None
            for item in tasks[key].items:
                items[(key, item.id)] = item
        item = items.get((key, row["item"]))
        if item is None or item.target != row["target"]:
            raise UserError(f"{where}: item {row['item']} of task {row['task']['task']} is "
                            f"{'missing' if item is None else 'not the one the row was built from (another target)'} "
                            "now; build the rows again from runs of the task as it is")
    return Episodes(tasks, items)


class Rewards:
    """Grades attempts with their task's grader, in grading processes kept for the whole training."""

    def __init__(self, episodes: Episodes, grader_timeout: float):
        self.episodes = episodes
        self.pool = GraderPool(grader_timeout)
        self.graders = {key: self.pool.limit(task.grade) for key, task in episodes.tasks.items()}
        self.threads = ThreadPoolExecutor(self.pool.processes)

    def __call__(self, rows: list[dict], replies: list[str]) -> list[float]:
        """The reward of each reply to its row's item: RIGHT or WRONG (a grade that timed out is wrong)."""

        def grade(row: dict, reply: str) -> float:
            key = row["task"]  # the dataset holds it as its key
            return RIGHT if self.graders[key](self.episodes.items[(key, row["item"])], reply).correct else WRONG

        return list(self.threads.map(grade, rows, replies))

    def close(self) -> None:
        self.threads.shutdown(cancel_futures=True)
        self.pool.close()


def correction_ids(tokenizer, correction: list[dict], eos_ids: set[int]) -> tuple[int, list[int]]:
    """(the token the chat template ends a reply with, the tokens between it and attempt 2's first token: what the
    template writes after a reply, the correction turn, and the header of the reply that answers it). Found by
    rendering a conversation with and without the correction turn; a template that does not render a conversation
    as a continuation of its beginning cannot be trained this way."""
    head = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    before = list(tokenizer.apply_chat_template(head, tokenize=True, return_dict=True)["input_ids"])
    after = list(tokenizer.apply_chat_template(head + correction, tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"])
    ends = [index for index, token in enumerate(before) if token in eos_ids]
    if not ends or after[: ends[-1] + 1] != before[: ends[-1] + 1]:
        raise UserError("the model's chat template does not render a correction turn as a continuation of the "
                        "conversation before it; rl training needs one that does")
    return before[ends[-1]], after[ends[-1] + 1:]


def rollout(prompts: list, trainer) -> dict:
    """TRL's rollout function (of a CorrectionRL trainer): one episode per prompt (TRL repeats each question
    `generations` times), both attempts sampled from the model as it is now, each turn one batched `generate` over
    all episodes."""
    rows, tokenizer = trainer.episode_rows, trainer.processing_class
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    first, first_logprobs = trainer._generate_single_turn(prompt_ids, None, {}, num_generations=1)
    eos = set(trainer.eos_token_ids)
    between = []
    for row, attempt in zip(rows, first):
        turn_end, correction = trainer.correction_tokens(row["correction"])
        # An attempt cut at --attempt-tokens gets the end-of-turn token the chat template closes a reply with.
        between.append(correction if attempt and attempt[-1] in eos else [turn_end, *correction])
    second, second_logprobs = trainer._generate_single_turn(
        [[*prompt, *attempt, *tokens] for prompt, attempt, tokens in zip(prompt_ids, first, between)], None, {},
        num_generations=1)
    text = functools.partial(tokenizer.decode, skip_special_tokens=True)
    r1 = trainer.rewards(rows, [text(attempt) for attempt in first])
    r2 = trainer.rewards(rows, [text(attempt) for attempt in second])
    episode = {
        "prompt_ids": [list(prompt) for prompt in prompt_ids],
        "completion_ids": [[*a1, *tokens, *a2] for a1, tokens, a2 in zip(first, between, second)],
        # 1: the model's own tokens (trained); 0: the correction turn put in between
        "env_mask": [[1] * len(a1) + [0] * len(tokens) + [1] * len(a2) for a1, tokens, a2 in zip(first, between, second)],
        "logprobs": None,
        "r1": r1, "r2": r2,  # extra fields: TRL passes them to the reward functions
    }
    if first_logprobs is not None:  # a vLLM server generated: its sampling log-probabilities, 0 on the inserted tokens
        episode["logprobs"] = [[*l1, *[0.0] * len(tokens), *l2]
                               for l1, tokens, l2 in zip(first_logprobs, between, second_logprobs)]
    return episode


def first_attempt_reward(prompts, completions, r1, **_) -> list[float]:
    return r1


def second_attempt_reward(prompts, completions, r2, **_) -> list[float]:
    return r2


def attempt_advantages(r1, r2, model_tokens, size: int, alpha: float, scale: str, mine: slice = slice(None)):
    """Per-token advantages of episodes (a tensor: episodes x completion tokens): attempt 1's tokens get r1,
    attempt 2's r2 + alpha * (r2 - r1), each less its mean over the group of `size` episodes of one question and,
    as TRL scales rewards (`scale`: "group", "batch" or "none"), over their spread. `r1` and `r2` hold every
    episode of the step (of every process), `model_tokens` this process's episodes' (`mine` of them): 1 where the
    model wrote the token, 0 on the correction turn between the attempts (and on padding after the end, 1)."""
    import torch
    from trl.trainer.utils import nanstd

    def normalised(rewards):
        grouped = rewards.view(-1, size)
        advantages = (grouped - grouped.nanmean(dim=1, keepdim=True)).view(-1)
        if scale == "group":
            advantages = advantages / (nanstd(grouped, dim=1).repeat_interleave(size) + 1e-4)
        elif scale == "batch":
            advantages = advantages / (nanstd(rewards) + 1e-4)
        return torch.nan_to_num(advantages, nan=0.0)[mine]

    first, second = normalised(r1), normalised(r2 + alpha * (r2 - r1))
    # From the first token of the correction turn on, the tokens are attempt 2's (or carry no loss).
    in_second = torch.cumsum(1 - model_tokens, dim=1) > 0
    return torch.where(in_second, second[:, None], first[:, None])


@functools.lru_cache(maxsize=1)
def _trainer_class():
    from trl import GRPOTrainer
    from trl.trainer.utils import RepeatSampler

    class PassSeededSampler(RepeatSampler):
        """TRL's sampler, with each pass's order a function of the seed and the pass (`set_epoch`, which the
        Trainer calls before each pass). TRL's draws every pass's order from one generator, so a training resumed
        after a whole pass saw the first pass's order again and ended with another adapter than an uninterrupted
        one."""

        def set_epoch(self, epoch: int) -> None:
            if self.shuffle:  # mixed, so that no pass of one seed has the order of a pass of another
                self.generator.manual_seed((self.seed or 0) * 1_000_003 + epoch)

    class CorrectionRL(GRPOTrainer):
        """GRPOTrainer with SCoRe's per-attempt rewards: per-token advantages over both attempts of an episode."""

        def __init__(self, *args, rewards: Rewards, alpha: float, **kwargs):
            self.rewards, self.alpha = rewards, alpha
            self.episode_rows: list[dict] = []
            self._corrections: dict[str, tuple[int, list[int]]] = {}  # a correction turn, tokenized once
            super().__init__(*args, rollout_func=rollout, reward_funcs=[first_attempt_reward, second_attempt_reward],
                             **kwargs)

        def correction_tokens(self, correction: list[dict]) -> tuple[int, list[int]]:
            """`correction_ids` of a correction turn (UserError for a chat template that cannot take one)."""
            key = json.dumps(correction)
            if key not in self._corrections:
                self._corrections[key] = correction_ids(self.processing_class, correction, set(self.eos_token_ids))
            return self._corrections[key]

        def _generate_and_score_completions(self, inputs):
            self.episode_rows = inputs  # the rollout's rows, in the order of its prompts
            output = super()._generate_and_score_completions(inputs)
            rewards = self._gathered_rewards  # (episodes of every process, 2): r1, r2
            size = self.num_generations if self.model.training else self.num_generations_eval
            mine = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
            output["advantages"] = attempt_advantages(rewards[:, 0], rewards[:, 1], output["tool_mask"], size,
                                                      self.alpha, self.scale_rewards, mine)
            r1, r2 = rewards[:, 0], rewards[:, 1]
            mode = "train" if self.model.training else "eval"
            for name, value in (("r1", r1.mean()), ("r2", r2.mean()),
                                ("right_to_wrong", ((r1 == RIGHT) & (r2 == WRONG)).float().mean()),
                                ("wrong_to_right", ((r1 == WRONG) & (r2 == RIGHT)).float().mean())):
                self._metrics[mode][name].append(value.item())
            return output

        def _get_train_sampler(self, dataset=None):
            made = super()._get_train_sampler(dataset)
            return PassSeededSampler(made.data_source, made.mini_repeat_count, made.batch_size, made.repeat_count,
                                     made.shuffle, made.seed)

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            self._gathered_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            return self._gathered_rewards

    return CorrectionRL


def build_rl_trainer(model, tokenizer, rows: list[dict], settings, common: dict, peft_config, rewards: Rewards):
    """The GRPO trainer of `model` (a PEFT model when training starts from an adapter, then `peft_config` is None)
    on the episode rows, with `common` the training arguments every trainer here takes."""
    from datasets import Dataset
    from trl import GRPOConfig

    # TRL counts an episode's tokens itself (prompt and completion); the Trainer's own count would look for
    # `input_ids`, which these batches lack.
    arguments = {**{key: value for key, value in common.items() if key != "max_length"},
                 "include_num_input_tokens_seen": "no"}
    # One rollout per step over all of its episodes (TRL's steps_per_generation follows the accumulation steps).
    part = math.gcd(settings.batch_size, LOSS_EPISODES)
    arguments.update(per_device_train_batch_size=part, gradient_accumulation_steps=settings.batch_size // part)
    config = GRPOConfig(
        num_generations=settings.generations, max_completion_length=settings.attempt_tokens,
        temperature=settings.rollout_temperature, beta=settings.kl, loss_type="dapo", scale_rewards="group",
        reward_weights=[0.0, 1.0],  # TRL's logged `reward` is attempt 2's; the advantages are ours
        disable_dropout=True,  # episodes are sampled in training mode: no dropout in them
        remove_unused_columns=False,  # the rollout reads the rows' task, item and correction
        **arguments,
    )
    # The task as its key: a column of objects would be given every key any row's options have.
    dataset = Dataset.from_list([{"prompt": row["prompt"], "correction": row["correction"],
                                  "task": task_key(row["task"]), "item": row["item"]} for row in rows])
    trainer = _trainer_class()(model=model, args=config, processing_class=tokenizer, train_dataset=dataset,
                               peft_config=peft_config, rewards=rewards, alpha=settings.alpha)
    for correction in {json.dumps(row["correction"]) for row in rows}:  # a template that cannot take one: now
        trainer.correction_tokens(json.loads(correction))
    return trainer
