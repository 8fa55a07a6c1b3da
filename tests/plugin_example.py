"""A package's plugin module as an entry point names it: importing it registers one task and one recipe
(tests/test_plugins.py lists it under the entry point groups)."""

from selfcorrect.tasks import Item, Task, register_task
from selfcorrect.tasks.grading import grade_number
from selfcorrect.train.data import Sources, register_recipe, sft


@register_task("plugin-doubles", "twice a number (a plugin's task)", grader="number", answer="a number", builtin=True)
def doubles(data, options) -> Task:
    items = [Item(id=f"double-{n}", question=f"What is 2 * {n}?", target=str(2 * n),
                  solution=f"2 * {n} = {2 * n}. The answer is {2 * n}.") for n in range(1, 6)]
    return Task(name="plugin-doubles", items=items, instruction=lambda item: 'End with "The answer is N."',
                grade=grade_number, max_tokens=64, identity={"task": "plugin-doubles"})


@register_recipe("plugin-sft-twice", "the sft rows, each twice (a plugin's recipe)", "prompt/completion",
                 needs_correction=False)
def sft_twice(sources: Sources) -> list[dict]:
    return sft(sources) * 2
