"""The IFEval task: each of the 25 instruction checks on hand-written replies that follow and break it, the loose
rule, the sentence splitter and word tokenizer, seeded language detection, loading the data (shared file and the
Hub's row form) with its errors, and the grade's extra fields."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA

from selfcorrect.errors import UserError
from selfcorrect.tasks import TASKS, Item, load_task
from selfcorrect.tasks import ifeval
from selfcorrect.tasks.ifeval import (
    INSTRUCTIONS, count_capital_words, count_sentences, count_words, detect_language, grade_ifeval,
    instruction_arguments, loose_variants, split_sentences, word_tokens,
)

DATA = SHARED_DATA / "ifeval.jsonl"


def item_with(instruction_ids: list[str], kwargs: list[dict], prompt: str = "a prompt") -> Item:
    """An item as the task stores it: the instructions and their arguments as JSON in the target."""
    target = json.dumps({"instruction_id_list": instruction_ids, "kwargs": kwargs, "prompt": prompt})
    return Item("t1", prompt, target)


REPEAT = ("Write an email to my boss telling him that I am quitting. The email must contain a title wrapped in "
          "double angular brackets, i.e. <<title>>.")
LONG = " ".join(["word"] * 300)

# (instruction id, its kwargs as in the data, a reply that follows it, a reply that does not)
CASES = [
    ("keywords:existence", {"keywords": ["correlated", "experiencing"]},
     "People experiencing stress often report that sleep and mood are Correlated.",
     "People under stress often report that sleep and mood are linked."),
    ("keywords:frequency", {"relation": "at least", "keyword": "story", "frequency": 2},
     "This story is short. The Story ends well.",
     "This story is short and ends well."),
    ("keywords:frequency", {"relation": "less than", "keyword": "flu", "frequency": 2},
     "The flu passed quickly.",
     "The flu passed; the FLU came back."),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]},
     "The band played rocking music on a rocky stage.",
     "The band played Rock music all night."),
    ("keywords:letter_frequency", {"let_relation": "at least", "letter": "#", "let_frequency": 4},
     "#one #two #three #four",
     "#one #two #three"),
    ("keywords:letter_frequency", {"let_relation": "less than", "letter": "q", "let_frequency": 2},
     "A quiet morning.",
     "A Quiet queue."),
    ("language:response_language", {"language": "kn"},
     "ಇದು ಕನ್ನಡದಲ್ಲಿ ಬರೆದ ಒಂದು ಸಣ್ಣ ವಾಕ್ಯವಾಗಿದೆ ಮತ್ತು ಇದು ಹವಾಮಾನದ ಬಗ್ಗೆ ಹೇಳುತ್ತದೆ.",
     "This is a short sentence written in English about the weather today."),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Dr. Smith arrived at 3.14 p.m. on Monday. He left early.",
     "He came. He saw. He left."),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3},
     "He came. He saw! Did he leave?",
     "Mr. Brown, e.g. the baker, sold 2.5 kg of bread. Then he closed."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First paragraph.\n***\nSecond paragraph.",
     "First paragraph.\n***\n\n***\nSecond paragraph."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 300},
     LONG,
     " ".join(["word"] * 299)),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5},
     "Four words, no more.",
     "It's five words, really."),
    ("length_constraints:nth_paragraph_first_word", {"first_word": "weekend", "num_paragraphs": 4, "nth_paragraph": 1},
     '"Weekend," she said.\n\nTwo.\n\nThree.\n\nFour.',
     "Saturday came.\n\nTwo.\n\nThree.\n\nFour."),
    ("length_constraints:nth_paragraph_first_word", {"first_word": "it", "num_paragraphs": 2, "nth_paragraph": 2},
     "One.\n\nIt's the second.",
     "One.\n\nIt's the second.\n\nAnd a third."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], you live at [address].",
     "Dear [name], you live nearby."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Thanks for reading.\n\np. s. see you soon",
     "Thanks for reading.\n\nPS see you soon"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Thanks.\nP.S. one\nP.P.S two",
     "Thanks.\nP.S. one"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "Here:\n* apples\n* pears\n- plums\n**Total** three",
     "Here:\n* apples\n* pears"),
    ("detectable_format:constrained_response", {},
     "Having thought about it, My answer is maybe.",
     "My answer is perhaps."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 3},
     "*intro* then **body** and *end*",
     "*intro* then ** ** and *end*"),
    ("detectable_format:multiple_sections", {"section_spliter": "PARAGRAPH", "num_sections": 2},
     "PARAGRAPH 1\nHello.\nPARAGRAPH 2\nBye.",
     "PARAGRAPH 1\nHello.\nParagraph 2\nBye."),
    ("detectable_format:json_format", {},
     '```json\n{"name": "Ann", "age": 3}\n```',
     '{"name": "Ann", "age": 3'),
    ("detectable_format:title", {},
     "<<My Holiday>>\nIt was fun.",
     "<< >>\nIt was fun."),
    ("combination:two_responses", {},
     "First answer.\n******\nSecond answer.",
     "Same answer.\n******\nSame answer."),
    ("combination:repeat_prompt", {"prompt_to_repeat": REPEAT},
     REPEAT.upper() + "\n<<Goodbye>>\nDear boss, I quit.",
     "Sure! " + REPEAT + "\n<<Goodbye>>"),
    ("startend:end_checker", {"end_phrase": "Can I get my money back for the classes I missed?"},
     'I was ill all March. "Can I get my money back for the classes I missed?"',
     "Can I get my money back for the classes I missed? Thanks."),
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 3},
     "This is VERY well-known.",
     "I DON'T like it."),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 3},
     "The WELL-KNOWN AT&T story.",
     "The WELL-KNOWN NASA story."),
    ("change_case:english_capital", {},
     "THIS IS A SHORT REPLY WRITTEN IN ENGLISH ABOUT THE WEATHER TODAY.",
     "THIS IS A SHORT REPLY WRITTEN IN ENGLISH ABOUT THE Weather TODAY."),
    ("change_case:english_capital", {},
     "THIS IS A SHORT REPLY WRITTEN IN ENGLISH ABOUT THE WEATHER TODAY.",
     "DIES IST EINE KURZE ANTWORT AUF DEUTSCH ÜBER DAS WETTER VON HEUTE UND MORGEN."),
    ("change_case:english_lowercase", {},
     "this is a short reply written in english about the weather today.",
     "this is a short reply written in English about the weather today."),
    ("change_case:english_lowercase", {},
     "this is a short reply written in english about the weather today.",
     "dies ist eine kurze antwort auf deutsch über das wetter von heute und morgen."),
    ("punctuation:no_comma", {},
     "No commas here; none at all.",
     "One comma, here."),
    ("startend:quotation", {},
     '  "Wrapped in quotes."\n',
     '"Almost wrapped." she said'),
]


@pytest.mark.parametrize("instruction_id, kwargs, passing, failing", CASES,
                         ids=[f"{case[0]}-{n}" for n, case in enumerate(CASES)])
def test_each_instruction_on_a_passing_and_a_failing_reply(instruction_id, kwargs, passing, failing):
    item = item_with([instruction_id], [instruction_arguments(instruction_id, kwargs)])
    followed, broken = grade_ifeval(item, passing), grade_ifeval(item, failing)
    assert followed.correct and followed.extra["strict"] == [True], followed.reason
    assert not broken.correct and broken.extra["strict"] == [False], broken.reason
    assert instruction_id in broken.reason


def test_the_cases_cover_all_25_instructions_of_the_data():
    in_data = set()
    for line in DATA.read_text().splitlines():
        in_data.update(json.loads(line)["instruction_id_list"])
    assert len(in_data) == 25
    assert set(INSTRUCTIONS) == in_data
    assert {case[0] for case in CASES} == in_data


def test_an_empty_reply_follows_no_instruction():
    item = item_with(["punctuation:no_comma", "keywords:forbidden_words"], [{}, {"forbidden_words": ["rock"]}])
    grade = grade_ifeval(item, "  \n ")
    assert grade.extra["strict"] == [False, False] and grade.extra["loose"] == [False, False]


def test_undetectable_language_counts_as_followed_as_in_the_reference():
    assert detect_language("12345 !!!") is None
    item = item_with(["language:response_language"], [{"language": "kn"}])
    assert grade_ifeval(item, "12345 !!!").correct


# The loose rule


def test_loose_passes_a_reply_that_fails_only_because_of_a_first_line():
    item = item_with(["punctuation:no_comma", "detectable_format:json_format"], [{}, {}])
    reply = 'Sure, here it is:\n{"city": "Oslo"}'
    grade = grade_ifeval(item, reply)
    assert grade.extra["strict"] == [False, False] and not grade.correct
    assert grade.extra["loose"] == [True, True] and grade.extra["loose_correct"]


def test_loose_removes_asterisks_and_last_lines_but_not_everything_passes():
    quotation = item_with(["startend:quotation"], [{}])
    assert grade_ifeval(quotation, '**"Hello there"**').extra["loose"] == [True]
    end = item_with(["startend:end_checker"], [{"end_phrase": "Peace!"}])
    assert grade_ifeval(end, "Peace!\nLet me know if you need more.").extra["loose"] == [True]
    # Neither line removal nor asterisks rescue a comma in the middle line.
    assert grade_ifeval(item_with(["punctuation:no_comma"], [{}]), "a\nb, c\nd").extra["loose"] == [False]


def test_loose_variants_are_the_references_eight():
    variants = loose_variants("first*\nmiddle*\nlast*")
    assert variants == [
        "first*\nmiddle*\nlast*", "first\nmiddle\nlast", "middle*\nlast*", "first*\nmiddle*", "middle*",
        "middle\nlast", "first\nmiddle", "middle",
    ]


# The grade


def test_grade_extra_fields_and_reason():
    ids = ["punctuation:no_comma", "keywords:existence", "startend:end_checker"]
    kwargs = [{}, {"keywords": ["tea"]}, {"end_phrase": "Bye."}]
    item = item_with(ids, kwargs)
    grade = grade_ifeval(item, "Sure, I have coffee.\nBye.")
    assert grade.answer is None and not grade.correct
    assert grade.extra == {"strict": [False, False, True], "loose": [True, False, True], "loose_correct": False,
                           "instructions": ids}
    assert grade.reason.startswith("not followed (strict): punctuation:no_comma, keywords:existence")
    assert "\n" not in grade.reason
    right = grade_ifeval(item, "I have tea.\nBye.")
    assert right.correct and right.extra["loose_correct"] and right.extra["strict"] == [True, True, True]
    assert right.reason == "all 3 instructions followed (strict)"


# Sentences, words, capital words


@pytest.mark.parametrize("text, sentences", [
    ("Mr. Smith met Dr. Jones. They talked.", ["Mr. Smith met Dr. Jones.", "They talked."]),
    ("Pi is about 3.14 and e is 2.72. Both are irrational.",
     ["Pi is about 3.14 and e is 2.72.", "Both are irrational."]),
    ("Use tools, e.g. a hammer, i.e. something heavy. Then rest.",
     ["Use tools, e.g. a hammer, i.e. something heavy.", "Then rest."]),
    ("She moved to the U.S. Army base. The U.S. is big.", ["She moved to the U.S. Army base.", "The U.S. is big."]),
    ("He lives in the U.S. The weather is fine.", ["He lives in the U.S.", "The weather is fine."]),
    ("I waited... Then it rang. Wait... and see.", ["I waited...", "Then it rang.", "Wait... and see."]),
    ("I waited… Then it rang.", ["I waited…", "Then it rang."]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("(It was late.) We slept. “Good night.” Morning came.",
     ["(It was late.)", "We slept.", "“Good night.”", "Morning came."]),
    ("**Done.** Next step!", ["**Done.**", "Next step!"]),
    ("Really?! Yes!! ok.", ["Really?!", "Yes!!", "ok."]),
    ("J. K. Rowling wrote it. Apples, pears, etc. The end.",
     ["J. K. Rowling wrote it.", "Apples, pears, etc.", "The end."]),
    ("First line.\nSecond line.", ["First line.", "Second line."]),
    ("A Heading\n\nThe first sentence. The second.", ["A Heading\n\nThe first sentence.", "The second."]),
    ("1. Apples.\n2. Pears.", ["1. Apples.", "2. Pears."]),
    ("Visit example.com today", ["Visit example.com today"]),
    ("It was 1999. The year ended.", ["It was 1999.", "The year ended."]),
    ("", []),
])
def test_sentence_splitter(text, sentences):
    assert split_sentences(text) == sentences
    assert count_sentences(text) == len(sentences)


def test_count_words_is_the_references_word_regexp():
    assert count_words("Hello, world! It's 3.14 -- well-known_thing") == 8  # Hello world It s 3 14 well known_thing
    assert count_words("Привет мир") == 2


def test_word_tokens_split_as_treebank_does_for_capital_words():
    assert word_tokens("I DON'T KNOW JOHN'S AT&T WELL-KNOWN cannot, ok") == [
        "I", "DO", "N'T", "KNOW", "JOHN", "'S", "AT", "&", "T", "WELL-KNOWN", "can", "not", ",", "ok"]
    assert count_capital_words("I DON'T KNOW 2024 U.S. --") == 5  # I DO N'T KNOW U.S


def test_language_detection_is_seeded():
    from langdetect import DetectorFactory

    # "Hello world" is one of the short texts langdetect calls 'en' or 'nl' depending on its random state.
    first = detect_language("Hello world")
    try:
        for seed in range(1, 20):
            DetectorFactory.seed = seed
            assert detect_language("Hello world") == first
        DetectorFactory.seed = None
        assert {detect_language("Hello world") for _ in range(10)} == {first}
    finally:
        DetectorFactory.seed = 0
    assert detect_language("Dies ist ein deutscher Satz über das Wetter von heute.") == "de"


# Loading


def test_loads_the_shared_data():
    task = load_task("ifeval", DATA)
    records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    assert len(task.items) == 541
    assert [item.id for item in task.items] == [str(record["id"]) for record in records]
    assert {i for record in records for i in record["instruction_id_list"]} == set(INSTRUCTIONS)
    for item, record in zip(task.items, records):
        assert task.prompt(item) == record["prompt"]  # the IFEval prompt exactly, nothing appended
        assert item.solution is None and record["prompt"] not in task.instruction(item)
    assert task.max_tokens == 1024
    assert task.identity["task"] == "ifeval" and task.identity["data_sha256"]
    assert TASKS["ifeval"].grader == "ifeval (strict, prompt level)"


def test_every_shared_item_grades():
    task = load_task("ifeval", DATA)
    for item in task.items:
        grade = task.grade(item, "A short reply, in English.")
        assert len(grade.extra["strict"]) == len(grade.extra["instructions"]) == len(grade.extra["loose"])
        assert grade.correct == all(grade.extra["strict"])


def test_other_tasks_still_append_their_instruction():
    task = load_task("arithmetic")
    item = task.items[0]
    assert task.prompt(item) == f"{item.question}\n{task.instruction(item)}"


def _write(tmp_path, *records) -> object:
    path = tmp_path / "mine.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {"id": 7, "prompt": "Write a haiku without commas.", "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}]}


@pytest.mark.parametrize("bad, message", [
    ('{"id": 8, "prompt": ', "mine.jsonl:2: not valid JSON"),
    ({**GOOD, "instruction_id_list": ["punctuation:no_semicolon"]},
     "mine.jsonl:2: field 'instruction_id_list' names unknown instruction 'punctuation:no_semicolon'"),
    ({**GOOD, "kwargs": []}, "mine.jsonl:2: field 'kwargs' must have one entry per instruction (1), got 0"),
    ({**GOOD, "instruction_id_list": ["keywords:frequency"], "kwargs": [{"keyword": "tea", "frequency": 2}]},
     "mine.jsonl:2: field 'kwargs' entry 1: 'keywords:frequency' needs argument 'relation'"),
    ({**GOOD, "instruction_id_list": ["keywords:frequency"],
      "kwargs": [{"keyword": "tea", "frequency": 2, "relation": "at most"}]},
     "mine.jsonl:2: field 'kwargs' entry 1: 'keywords:frequency' argument 'relation' must be 'less than' or "
     "'at least'"),
    ({**GOOD, "kwargs": [{"num_words": 3}]},
     "mine.jsonl:2: field 'kwargs' entry 1: 'punctuation:no_comma' takes no argument 'num_words'"),
    ({**GOOD, "instruction_id_list": ["language:response_language"], "kwargs": [{"language": "xx"}]},
     "mine.jsonl:2: field 'kwargs' entry 1: 'language:response_language' argument 'language' must be"),
    ({key: value for key, value in GOOD.items() if key != "prompt"}, "mine.jsonl:2: record has no field 'prompt'"),
    ({**GOOD, "id": 7}, "item id '7' appears twice"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, bad, message):
    path = _write(tmp_path, GOOD, bad)
    with pytest.raises(UserError) as raised:
        load_task("ifeval", path)
    assert message in str(raised.value)


def test_reference_key_field_and_null_arguments_are_accepted(tmp_path):
    record = {"key": 1001, "prompt": "Answer in under 5 words.",
              "instruction_id_list": ["length_constraints:number_words"],
              "kwargs": [{"num_words": 5, "relation": "less than", "keywords": None, "language": None}]}
    task = load_task("ifeval", _write(tmp_path, record))
    assert [item.id for item in task.items] == ["1001"]
    assert task.grade(task.items[0], "Four short words here.").correct
    assert not task.grade(task.items[0], "These are five words here.").correct


def test_hub_rows_load_without_a_file(monkeypatch):
    asked = []
    rows = [{"key": 1000 + n, "prompt": f"Prompt {n} without commas.", "instruction_id_list": ["punctuation:no_comma"],
             "kwargs": [{"num_words": None, "relation": None, "language": None}]} for n in range(3)]

    def hub(dataset, config, split, task):
        asked.append((dataset, config, split, task))
        return rows

    monkeypatch.setattr(ifeval, "load_hub_rows", hub)
    task = load_task("ifeval")
    assert asked == [("google/IFEval", None, "train", "ifeval")]
    assert [item.id for item in task.items] == ["1000", "1001", "1002"]
    assert task.prompt(task.items[1]) == "Prompt 1 without commas."
    assert task.identity == {"task": "ifeval", "hub": "google/IFEval:train"}
    rows[1]["instruction_id_list"] = ["no:such"]
    with pytest.raises(UserError, match=r"hf:google/IFEval:2: field 'instruction_id_list' names unknown"):
        load_task("ifeval")


def test_the_report_gives_prompt_and_instruction_level_accuracy_under_both_checks(tmp_path):
    """Three replies to item 1001 ("no commas") and item 1000 (no commas, 3 highlights, 300+ words), scripted;
    the four accuracies worked out by hand from which instructions each reply follows."""
    from conftest import SHARED_DATA, ScriptedBackend
    from selfcorrect import evaluate

    long_text = " ".join(["word"] * 310)
    replies = {
        # 1000: strict follows no-comma and 300+ words, misses the highlights; loose the same. 1001: follows.
        "round0-1000": f"Sure *one* *two*\n{long_text}",
        "round0-1001": "No commas here at all.",
        # Round 1 for 1000: a first line with a comma, then all three instructions followed: loose only.
        "round1-1000": f"Here it is, as asked:\n*a* *b* *c* {long_text}",
        "round1-1001": "A comma, sadly.",
    }

    def reply(messages, seed):
        item = "1000" if "Tripoli" in messages[0]["content"] else "1001"
        return replies[f"round{(len(messages) - 1) // 2}-{item}"]

    data = tmp_path / "two.jsonl"
    data.write_text("".join(line for line in (SHARED_DATA / "ifeval.jsonl").read_text().splitlines(True)
                            if line.startswith(('{"id": 1000,', '{"id": 1001,'))))
    run = evaluate(task="ifeval", data=data, rounds=1, backend=ScriptedBackend(reply), db=tmp_path / "r.sqlite")
    first, second = run.report()["instruction_following"]
    # Round 0: 1000 follows 2 of 3 (strict and loose), 1001 follows 1 of 1.
    assert first == {"round": 0, "replies": 2, "prompt_strict": 0.5, "prompt_loose": 0.5,
                     "instruction_strict": 0.75, "instruction_loose": 0.75}
    # Round 1: 1000 misses no-comma strictly (the first line), follows all 3 loosely; 1001 misses its one.
    assert second == {"round": 1, "replies": 2, "prompt_strict": 0.0, "prompt_loose": 0.5,
                      "instruction_strict": 0.5, "instruction_loose": 0.75}
