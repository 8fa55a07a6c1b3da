"""On-policy correction RL (`selfcorrect train` on episode rows, train/rl.py): per-attempt advantages (a wrong first
attempt earns nothing for being fixed afterwards), an episode laid out as the conversation a run measures with the
correction turn out of the loss, rollouts from the adapter as it is now, a step that moves the policy towards what
earned more, a real training of the embedded model from a trained adapter (the card of its rollouts, the leak
check covering the questions of both trainings), and a resumed training ending as an uninterrupted one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selfcorrect.errors import UserError
from selfcorrect.split import check_no_leak, question_key
from selfcorrect.tasks import load_task

from test_train_lora import sft_rows, write_jsonl

torch = pytest.importorskip("torch", reason="the train extra is not installed (pip install 'selfcorrect[train]')")
pytest.importorskip("trl", reason="the train extra is not installed (pip install 'selfcorrect[train]')")

from selfcorrect.train.rl import attempt_advantages, correction_ids, rollout  # noqa: E402

CORRECTION = [{"role": "user", "content": "Your previous answer may be wrong. Check it and answer again."}]


def _episode_rows(items: int) -> list[dict]:
    """Episode rows of the first `items` arithmetic questions, as `selfcorrect data --recipe rl` writes them."""
    task = load_task("arithmetic")
    return [{"prompt": [{"role": "user", "content": task.prompt(item)}], "correction": CORRECTION,
             "task": {"task": "arithmetic", "data": None, "options": {}}, "item": item.id, "target": item.target,
             "source": {"recipe": "rl", "part": "rl", "run": "r1", "item": item.id, "sample": 0, "round": 1,
                        "question_sha256": question_key(item.question)}}
            for item in task.items[:items]]


# --- the rewards of the attempts ---------------------------------------------------------------------------------

def test_a_deliberately_wrong_first_attempt_earns_nothing_for_being_fixed():
    """Episode 0 answers wrong, then right; the others of its question answer right twice. Its first attempt is
    below its group's (a negative advantage on its tokens), its second attempt above. One reward for the whole
    episode, r2 + alpha (r2 - r1), would pay the wrong first attempt too: the bonus makes a wrong start pay."""
    model_tokens = torch.tensor([[1, 1, 0, 0, 1, 1]] * 4)  # attempt 1, the correction turn, attempt 2
    r1, r2 = torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    advantages = attempt_advantages(r1, r2, model_tokens, 4, 1.0, "group")
    assert (advantages[0, :2] < 0).all() and (advantages[0, 2:] > 0).all(), advantages

    # Where every first attempt of the question is wrong, a wrong first attempt earns exactly nothing, and the
    # fix earns attempt 2 alone.
    r1, r2 = torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 0.0])
    advantages = attempt_advantages(r1, r2, model_tokens, 4, 1.0, "group")
    assert (advantages[:, :2] == 0).all() and (advantages[0, 4:] > 0).all() and (advantages[1:, 4:] < 0).all()

    # Groups are normalised apart: a second question's episodes do not shift the first's.
    both = attempt_advantages(torch.cat([r1, torch.ones(4)]), torch.cat([r2, torch.ones(4)]),
                              torch.cat([model_tokens, model_tokens]), 4, 1.0, "group")
    assert torch.equal(both[:4], advantages) and (both[4:] == 0).all()


@pytest.mark.parametrize("rows, setting, refusal", [
    ("rl", {"batch_size": 6, "generations": 4}, r"--batch-size 6: an rl step takes whole groups of episodes; give a "
                                                r"multiple of --generations 4"),
    ("rl", {"generations": 1}, r"--generations 1: must be at least 2"),
    ("rl", {"kl": -0.1}, r"--kl -0.1: must be at least 0"),
    ("rl", {"init": "embedded"}, r"--init embedded: give a trained model, lora:DIR"),
    ("sft", {"init": "lora:x"}, r"--init lora:x: only rl training \(episode rows\) starts from a trained adapter"),
    ("rl", {"batch_size": 8, "generations": 2}, r"--batch-size 8: an rl step takes 4 questions \(2 episodes each\) "
                                                r"and the data has 2; give a smaller --batch-size or more rows"),
    ("rl", {"isolation": "loose"}, r"--isolation loose"),
])
def test_rl_settings_are_checked_before_anything_loads(tmp_path, rows, setting, refusal):
    from selfcorrect.train.trainer import train

    data = write_jsonl(tmp_path / "rows.jsonl", _episode_rows(2) if rows == "rl" else sft_rows())
    with pytest.raises(UserError, match=refusal):
        train(data, "embedded", tmp_path / "adapter", **setting)
    assert not (tmp_path / "adapter").exists()


def test_episode_rows_whose_item_changed_are_refused(tmp_path):
    from selfcorrect.train.trainer import train

    rows = _episode_rows(2)
    rows[1]["target"] = "12345"
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(UserError, match=rf"^{data}: item {rows[1]['item']} of task arithmetic is not the one the row "
                                        "was built from"):
        train(data, "embedded", tmp_path / "adapter")


def test_improve_refuses_rl_with_a_strategy_that_answers_the_reply(tmp_path):
    from conftest import cli

    result = cli("improve", "--output", str(tmp_path / "out"), "--recipe", "rl", "--strategy", "critique",
                 "--db", str(tmp_path / "runs.sqlite"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --recipe rl: needs a strategy whose correction turn is a fixed prompt (reask, confident, critical), "
        "not --strategy critique"], result.stderr
    assert not (tmp_path / "runs.sqlite").exists()


# --- an episode's tokens -------------------------------------------------------------------------------------------

class _Policy:
    """Stands in for the trainer's generation (the rollout's scheduling is tested here; the real one below):
    replies given per turn, as token ids."""

    def __init__(self, tokenizer, first: list[str], second: list[str], cut_first: bool):
        self.processing_class, self.eos_token_ids = tokenizer, [tokenizer.eos_token_id]
        self.turns, self.cut_first, self.asked = [first, second], cut_first, []
        self.episode_rows = []
        self.rewards = lambda rows, replies: [1.0 if "5" in reply else 0.0 for reply in replies]

    def correction_tokens(self, correction):
        return correction_ids(self.processing_class, correction, set(self.eos_token_ids))

    def _tokenize_prompts(self, prompts):
        return [list(self.processing_class.apply_chat_template(p, tokenize=True, add_generation_prompt=True,
                                                               return_dict=True)["input_ids"]) for p in prompts], None, None

    def _generate_single_turn(self, prompt_ids, images, fields, num_generations):
        self.asked.append(prompt_ids)
        texts, cut = self.turns.pop(0), self.cut_first and len(self.turns) == 1
        ids = [self.processing_class.encode(text, add_special_tokens=False) for text in texts]
        return [i if cut else [*i, self.processing_class.eos_token_id] for i in ids], None


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("cut_first", [False, True])
def test_an_episode_is_the_conversation_a_run_measures_with_the_correction_out_of_the_loss(cut_first):
    """The tokens of an episode are the chat template's rendering of question, attempt 1, correction turn and
    attempt 2, as the trained model is measured; the mask leaves out exactly the correction turn (and, for a first
    attempt cut at --attempt-tokens, the end-of-turn put in to close it); turn 2 continues turn 1's tokens; the
    rewards are each attempt's."""
    from selfcorrect.train.trainer import base_model

    _, tokenizer, _ = base_model("embedded")
    rows = _episode_rows(2)
    policy = _Policy(tokenizer, ["The answer is 5.", "It is 3."], ["The answer is 4.", "The answer is 5."], cut_first)
    policy.episode_rows = rows
    episode = rollout([row["prompt"] for row in rows], policy)
    assert episode["r1"] == [1.0, 0.0] and episode["r2"] == [0.0, 1.0]
    for index, row in enumerate(rows):
        tokens = episode["prompt_ids"][index] + episode["completion_ids"][index]
        replies = [["The answer is 5.", "It is 3."][index], ["The answer is 4.", "The answer is 5."][index]]
        conversation = [*row["prompt"], {"role": "assistant", "content": replies[0]}, *row["correction"],
                        {"role": "assistant", "content": replies[1]}]
        rendered = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
        assert tokens == rendered[: len(tokens)] and len(rendered) - len(tokens) <= 1  # a final newline at most
        masked = [token for token, bit in zip(episode["completion_ids"][index], episode["env_mask"][index]) if not bit]
        trained = tokenizer.decode([t for t, bit in zip(episode["completion_ids"][index], episode["env_mask"][index]) if bit])
        assert trained == f"{replies[0]}{'' if cut_first else tokenizer.eos_token}{replies[1]}{tokenizer.eos_token}"
        turn_end, correction = policy.correction_tokens(row["correction"])
        assert turn_end == tokenizer.convert_tokens_to_ids("<|im_end|>")  # what the template ends a reply with
        assert masked == ([turn_end] if cut_first else []) + correction
        assert policy.asked[1][index] == episode["prompt_ids"][index] + episode["completion_ids"][index][
            : len(episode["completion_ids"][index]) - len(tokenizer.encode(replies[1], add_special_tokens=False)) - 1]


# --- real trainings of the embedded model --------------------------------------------------------------------------

RL = dict(max_steps=2, batch_size=4, generations=2, attempt_tokens=16, seed=0, kl=0.05)


@pytest.fixture(scope="module")
def init_adapter(trained_adapter) -> Path:
    """The adapter rl starts from: a short supervised training on sft rows (the session's)."""
    return trained_adapter


@pytest.fixture(scope="module")
def episodes(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("episodes") / "rl.jsonl", _episode_rows(4))


@pytest.fixture(scope="module")
def rl_trained(init_adapter, episodes, tmp_path_factory):
    from selfcorrect.train.trainer import train

    output = tmp_path_factory.mktemp("rl") / "adapter"
    return output, train(episodes, "embedded", output, init=f"lora:{init_adapter}", **RL)


@pytest.mark.slow
@pytest.mark.model
def test_rl_training_writes_an_adapter_and_a_card_of_its_rollouts(rl_trained, init_adapter):
    output, card = rl_trained
    assert card["training"]["trainer"] == "GRPOTrainer" and card["training"]["steps"] == 2
    assert card["data"]["format"] == "episode" and card["init"] == f"lora:{init_adapter}"
    shaping = card["hyperparameters"]
    assert (shaping["generations"], shaping["kl"], shaping["alpha"], shaping["attempt_tokens"]) == (2, 0.05, 1.0, 16)
    assert shaping["init"].startswith(f"lora:{init_adapter}:")  # and the init adapter's digest
    for log in card["losses"]:  # what each log line says of its rollouts, kept for the improve page
        assert {"r1", "r2", "right_to_wrong", "wrong_to_right", "kl"} <= set(log), log
        assert 0 <= log["right_to_wrong"] <= min(log["r1"], 1 - log["r2"]) + 1e-9
    assert (output / "adapter_model.safetensors").is_file() and (output / "adapter.gguf").is_file()
    assert not (output / "ref").exists()  # the KL's frozen reference is not part of the adapter


@pytest.mark.slow
@pytest.mark.model
def test_the_improve_page_draws_the_loss_and_the_rollouts_first(rl_trained):
    from selfcorrect.improve_page import _curves

    _, card = rl_trained
    drawn = re.findall(r'id="curve-([^"]+)"', _curves({"rl": card}))
    assert drawn[:5] == ["loss", "r1", "r2", "right_to_wrong", "wrong_to_right"]
    assert "entropy" in drawn and "step_time" not in drawn  # TRL's values follow; its time per step is no curve


@pytest.mark.slow
@pytest.mark.model
def test_an_rl_model_is_refused_its_questions_and_those_of_its_init_adapter(rl_trained, init_adapter):
    from selfcorrect.models.spec import trained_questions

    output, card = rl_trained
    spec = f"lora:{output}"
    rl_questions = {row["source"]["question_sha256"] for row in _episode_rows(4)}
    init_questions = trained_questions(f"lora:{init_adapter}")
    assert trained_questions(spec) == rl_questions | init_questions and init_questions - rl_questions
    first_sft = sft_rows()[0]["prompt"][0]["content"]
    with pytest.raises(UserError, match="training"):
        check_no_leak([("q", first_sft)], trained_questions(spec), spec, False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """`hf:DIR` of a small random Llama with the embedded model's tokenizer: the trainer's machinery at a small
    cost (it never answers right, so tests of learning give it a reward of their own)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfcorrect.train.trainer import base_model

    _, tokenizer, _ = base_model("embedded")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return f"hf:{folder}"


def _short_replies_earn_more(self, rows, replies) -> list[float]:
    """A stand-in reward that any model can learn and whose episodes always differ: the shorter, the better."""
    return [-float(len(reply)) for reply in replies]


@pytest.mark.slow
@pytest.mark.model
def test_an_rl_training_resumed_after_a_whole_pass_ends_with_the_same_adapter(tiny_model, tmp_path, monkeypatch):
    """Killed after the checkpoint that ends the first pass over the questions (4 questions, 2 steps a pass), run
    again: the same rollouts and the same adapter, bit for bit, as an uninterrupted training (TRL's own sampler
    started the second pass in the first pass's order again)."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from selfcorrect.train import rl
    from selfcorrect.train.trainer import train

    monkeypatch.setattr(rl.Rewards, "__call__", _short_replies_earn_more)
    init = tmp_path / "init"
    train(write_jsonl(tmp_path / "sft.jsonl", sft_rows()), tiny_model, init, max_steps=2, batch_size=4)
    data = write_jsonl(tmp_path / "rl.jsonl", _episode_rows(4))
    settings = dict(max_steps=3, batch_size=4, generations=2, attempt_tokens=8, save_steps=2, kl=0.05,
                    init=f"lora:{init}")
    whole = train(data, tiny_model, tmp_path / "whole", **settings)

    class CtrlCAtStep3(TrainerCallback):  # after the checkpoint of step 2, the end of the first pass
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data, tiny_model, tmp_path / "cut", callbacks=(CtrlCAtStep3(),), **settings)
    resumed = train(data, tiny_model, tmp_path / "cut", **settings)
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert [(log["r1"], log["r2"], log["loss"]) for log in resumed["losses"]] == \
        [(log["r1"], log["r2"], log["loss"]) for log in whole["losses"]]
    assert whole["losses"][-1]["kl"] > 0  # the step after the first moved away from the init adapter


def _trainer(model: str, rows: list[dict], tmp_path: Path, **settings):
    """The rl trainer the `train` command would build, outside a training."""
    import copy

    from selfcorrect.train.rl import Rewards, load_episodes
    from selfcorrect.train.settings import Hyperparameters
    from selfcorrect.train.trainer import TrainingData, base_model, build_trainer

    data = TrainingData(tmp_path / "rl.jsonl", "episode", rows, "rl", [])
    base, tokenizer, _ = base_model(model)
    rewards = Rewards(load_episodes(rows, data.path), 10.0)
    trainer, _ = build_trainer(copy.deepcopy(base), tokenizer, data, Hyperparameters(**settings), tmp_path / "ckpt",
                               rewards=rewards)
    return trainer, rewards


@pytest.mark.slow
@pytest.mark.model
def test_rollouts_come_from_the_adapter_as_it_is_now(tiny_model, tmp_path):
    trainer, rewards = _trainer(tiny_model, _episode_rows(2), tmp_path, generations=2, batch_size=4, attempt_tokens=12)
    try:  # the rows as the trainer's dataset holds them, the task by its key
        rows = [{**row, "task": json.dumps(row["task"], sort_keys=True)} for row in _episode_rows(2)]
        trainer.episode_rows = rows
        prompts = [row["prompt"] for row in rows]

        def sampled() -> list[list[int]]:
            torch.manual_seed(0)
            return rollout(prompts, trainer)["completion_ids"]

        before = sampled()
        assert sampled() == before  # the same random stream, the same episodes
        with torch.no_grad():  # a new LoRA starts with B = 0: give it weights, as training would
            for name, weight in trainer.model.named_parameters():
                if "lora_B" in name:
                    weight.add_(0.05)
        assert sampled() != before
    finally:
        rewards.close()


@pytest.mark.slow
@pytest.mark.model
def test_a_step_moves_the_policy_towards_the_episodes_that_earned_more(tiny_model, tmp_path, monkeypatch):
    """One step on an easy reward (a short attempt 2; every group differs in it): the log-probabilities of the
    episodes' trained tokens move with their advantages (the sum of advantage x change is positive), so the
    expected reward rises. The reward here is a stand-in; the task's grader is tested with the trainings above."""
    from selfcorrect.train import rl
    from selfcorrect.train.trainer import train

    monkeypatch.setattr(rl.Rewards, "__call__", _short_replies_earn_more)
    seen = {}
    generate = rl._trainer_class()._generate_and_score_completions

    def keep(self, inputs):
        output = generate(self, inputs)
        seen.update(trainer=self, output=output, before=_logps(self.model, output))
        return output

    monkeypatch.setattr(rl._trainer_class(), "_generate_and_score_completions", keep)
    data = write_jsonl(tmp_path / "rl.jsonl", _episode_rows(2))
    train(data, tiny_model, tmp_path / "adapter", max_steps=1, batch_size=8, generations=4, attempt_tokens=16,
          learning_rate=1e-4)
    output = seen["output"]
    change = _logps(seen["trainer"].model, output) - seen["before"]
    weights = output["advantages"] * output["completion_mask"] * output["tool_mask"]
    assert weights.abs().sum() > 0  # the rewards differed within the groups
    assert (weights * change).sum() > 0, (weights * change).sum()


def _logps(model, output) -> "torch.Tensor":
    """Log-probabilities of each completion token given what precedes it."""
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, output["prompt_ids"].size(1) - 1: -1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, output["completion_ids"].unsqueeze(-1)).squeeze(-1)


@pytest.mark.slow
@pytest.mark.model
def test_a_step_taken_in_parts_moves_the_adapter_as_the_whole_step_does(tiny_model, tmp_path, monkeypatch):
    """The loss of a step's episodes goes through the model in parts of LOSS_EPISODES (their gradients added up, the
    loss normalised over the whole step): the same rollouts and the same adapter, up to the order of float sums,
    as one pass over all of them."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from selfcorrect.train import rl
    from selfcorrect.train.trainer import train

    monkeypatch.setattr(rl.Rewards, "__call__", _short_replies_earn_more)
    data = write_jsonl(tmp_path / "rl.jsonl", _episode_rows(4))
    settings = dict(max_steps=2, batch_size=8, generations=4, attempt_tokens=12, learning_rate=1e-3)
    cards, passes = {}, {}

    class Passes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            passes[parts] = (args.per_device_train_batch_size, args.gradient_accumulation_steps)

    for parts in (8, 2):
        monkeypatch.setattr(rl, "LOSS_EPISODES", parts)
        cards[parts] = train(data, tiny_model, tmp_path / f"parts{parts}", callbacks=(Passes(),), **settings)
    assert passes == {8: (8, 1), 2: (2, 4)}
    whole, split = (load_file(tmp_path / f"parts{parts}" / "adapter_model.safetensors") for parts in (8, 2))
    assert [(log["r1"], log["r2"]) for log in cards[8]["losses"]] == [(log["r1"], log["r2"]) for log in cards[2]["losses"]]
    moved = max(weight.abs().max().item() for name, weight in whole.items() if "lora_B" in name)  # from 0
    assert moved > 0
    differ = max((whole[name] - split[name]).abs().max().item() for name in whole)
    assert differ <= 0.01 * moved, (differ, moved)
    losses = [[log["loss"] for log in cards[parts]["losses"]] for parts in (8, 2)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-6)
