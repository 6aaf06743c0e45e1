"""Learning mechanics: edit formats, repair, duplicates, ties, candidates, selection, cache."""

from __future__ import annotations

import json
import random

import pytest

from mlflow_genopt import ArtifactSpec, ArtifactVersion, LoopConfig, Parameter, Trial
from mlflow_genopt.config import ConfigError
from mlflow_genopt.formats import DiffFormat, JsonFormat, TaggedFormat, apply_edit
from mlflow_genopt.history import History
from mlflow_genopt.llm.base import Completion
from mlflow_genopt.llm.scripted import ScriptedLLM
from mlflow_genopt.loop import LearningLoop, accept
from mlflow_genopt.optimizer import Optimizer
from mlflow_genopt.proposals import InvalidProposal, validate_value
from mlflow_genopt.selection import pareto_frontier, select_parent

from test_loop import make_loop
from toy import WordTask, answer

CODE = Parameter("train_model", "code", "fit and return a model")
PROMPT = Parameter("prompt", "prompt", "the template", placeholders=("{question}",))
SPEC = ArtifactSpec((CODE,))
HARD = '''def train_model(dataset):
    """Fit a "robust" model: quotes ' and \\" and \\\\ backslashes, {braces} and f-strings."""
    pattern = r"\\d+\\.\\d*"
    text = f"{dataset!r} {{literal}}"
    return {"pattern": pattern, "text": text}
'''
CURRENT = ArtifactVersion({"train_model": "def train_model(dataset):\n    return 1\n"}, 0)


# --- edit formats ----------------------------------------------------------------------------
def test_tagged_answers_carry_code_with_quotes_backslashes_docstrings_and_braces_verbatim():
    raw = f"<reasoning>\nMore robust.\n</reasoning>\n<train_model>\n{HARD}</train_model>\n"
    parsed = TaggedFormat().parse(raw, SPEC, CURRENT)
    assert parsed.values["train_model"].rstrip("\n") == HARD.rstrip("\n")
    assert parsed.reasoning == "More robust."
    value, repairs = validate_value(CODE, parsed.values["train_model"])
    assert value == HARD.rstrip("\n") and repairs == ()
    fenced = raw.replace("<train_model>\n", "<train_model>\n```python\n").replace("</train_model>", "```\n</train_model>")
    assert validate_value(CODE, TaggedFormat().parse(fenced, SPEC, CURRENT).values["train_model"])[0] == HARD.rstrip("\n")
    thinking = "<think>\nlet me see <train_model> no\n</think>\n" + raw
    assert TaggedFormat().parse(thinking, SPEC, CURRENT).values["train_model"].rstrip() == HARD.rstrip()


def test_tagged_answers_for_several_functions_rewrite_only_the_ones_they_change():
    # rewriting all five ML-pipeline functions to change one cost Qwen 1.5B hundreds of tokens
    spec = ArtifactSpec((Parameter("preprocess", "code", "p"), CODE))
    current = ArtifactVersion({"preprocess": "def preprocess(df):\n    return df\n",
                               "train_model": CURRENT.values["train_model"]}, 0)
    fmt = TaggedFormat()
    grammar = fmt.request(spec)["grammar"]
    assert 'root ::= "<reasoning>\\n" reasoning "</reasoning>\\n" ( p0 | p1 ){1,2}' in grammar
    assert 'cbody0 ::= ( chead "\\n"{1,2} )* "async "? "def preprocess(" [^\\n]* "\\n" body' in grammar
    assert '"<" ( [^/A-Za-z_\\n]' in grammar  # a code line never opens another block
    shown = fmt.instructions(spec)  # one generic block: a layout of every block was copied whole
    assert "<name>\n" in shown and "one of: preprocess, train_model" in shown
    assert "<preprocess>" not in shown and "a parameter you leave out keeps" in shown
    assert "parameters you leave out keep their current value" in fmt.system_text(spec)
    # one trainable parameter: its block is required, and the wording is unchanged
    assert 'reasoning "</reasoning>\\n" p0\n' in fmt.request(SPEC)["grammar"]
    assert fmt.system_text(SPEC) == fmt.system and "<train_model>\n" in fmt.instructions(SPEC)
    raw = ("<reasoning>\nfill gaps\n</reasoning>\n<preprocess>\ndef preprocess(df):\n"
           "    return df.fillna(0)\n</preprocess>\n")
    [proposal] = Optimizer(ScriptedLLM([raw]), edit_format="tagged", repair_attempts=0
                           ).propose_candidates([{"role": "user", "content": "ctx"}], spec,
                                                current, seeds=[0])
    assert proposal.valid and "fillna(0)" in proposal.values["preprocess"]
    assert set(proposal.values) == {"preprocess"}  # train_model keeps its current value
    # Qwen 1.5B wrote a note about the next function after each one: the notes are dropped (and
    # recorded), the functions kept; a function that is itself broken is still invalid
    noted = ("<reasoning>\nr\n</reasoning>\n<preprocess>\ndef preprocess(df):\n"
             "    return df.dropna()\n\n< reasoning>\nThe train_model function is fine as it is.\n"
             "</preprocess>\n")
    [proposal] = Optimizer(ScriptedLLM([noted]), edit_format="tagged", repair_attempts=0
                           ).propose_candidates([{"role": "user", "content": "ctx"}], spec,
                                                current, seeds=[0])
    assert proposal.valid and proposal.values["preprocess"].endswith("return df.dropna()\n")
    assert proposal.repairs == ("preprocess: dropped 2 line(s) after the function that are not "
                                "Python, from `< reasoning>`",)
    broken = noted.replace("df.dropna()", "df.dropna(")
    [proposal] = Optimizer(ScriptedLLM([broken]), edit_format="tagged", repair_attempts=0
                           ).propose_candidates([{"role": "user", "content": "ctx"}], spec,
                                                current, seeds=[0])
    assert not proposal.valid and "SyntaxError" in proposal.invalid_reason


def test_json_answers_survive_the_same_code_when_escaped_and_fail_with_the_place_when_not():
    good = json.dumps({"reasoning": "r", "train_model": HARD})
    assert JsonFormat().parse(good, SPEC, CURRENT).values["train_model"] == HARD
    broken = '{"reasoning": "r", "train_model": "def train_model(d):\n    return "x"\n"}'
    with pytest.raises(InvalidProposal) as info:
        JsonFormat().parse(broken, SPEC, CURRENT)
    assert str(info.value).startswith("answer is not JSON") and "<<HERE>>" in info.value.detail


def test_diff_edits_apply_with_whitespace_tolerance_and_quote_the_nearest_lines_when_they_miss():
    current = "def f(x):\n    y = x + 1\n    return y\n"
    assert apply_edit(current, "    y = x + 1\n", "    y = x + 2\n", "f", 1) == "def f(x):\n    y = x + 2\n    return y\n"
    assert apply_edit(current, "y = x + 1   \n", "    y = x * 3\n", "f", 1).splitlines()[1] == "    y = x * 3"
    assert apply_edit(current, "", "def f(x):\n    return 0\n", "f", 1) == "def f(x):\n    return 0"
    with pytest.raises(InvalidProposal) as info:
        apply_edit(current, "    z = x - 1\n", "    z = 0\n", "f", 1)
    assert "matches nothing" in str(info.value) and "y = x + 1" in info.value.detail
    with pytest.raises(InvalidProposal, match="matches 2 places"):
        apply_edit("a\nb\na\n", "a\n", "c\n", "f", 1)
    # a SEARCH indented less (or more) than the lines it matches: the replacement moves with it,
    # relative indentation kept (Qwen 1.5B wrote 4 spaces for a line nested at 8 inside an if)
    nested = "def f(x):\n    if x:\n        y = 1\n    return y\n"
    shifted = apply_edit(nested, "    y = 1\n", "    y = 2\n    if y:\n        y = 3\n", "f", 1)
    assert shifted == "def f(x):\n    if x:\n        y = 2\n        if y:\n            y = 3\n    return y\n"
    assert apply_edit(nested, "y = 1\n", "y = 4\n", "f", 1).splitlines()[2] == "        y = 4"
    assert apply_edit(nested, "            y = 1\n", "            y = 5\n", "f", 1).splitlines()[2] == "        y = 5"
    spec = ArtifactSpec((Parameter("f", "code", "f"),))
    raw = "<reasoning>\nadd two\n</reasoning>\n<<<<<<< SEARCH f\n    y = x + 1\n=======\n    y = x + 2\n>>>>>>> REPLACE\n"
    parsed = DiffFormat().parse(raw, spec, ArtifactVersion({"f": current}, 0))
    assert parsed.values == {"f": "def f(x):\n    y = x + 2\n    return y\n"} and parsed.reasoning == "add two"


def test_diff_edits_apply_to_a_near_copy_of_one_place_and_to_the_function_that_holds_the_lines():
    current = ("def train(X, y):\n    model = RandomForestClassifier(n_estimators=100)\n"
               "    model.fit(X, y)\n    return model\n")
    # a SEARCH line with a changed argument (Qwen 1.5B copied from memory, not from the value)
    edited = apply_edit(current, "model = RandomForestClassifier(n_estimators=10)\n",
                        "model = RandomForestClassifier(n_estimators=300)\n", "train", 1)
    assert edited.splitlines()[1] == "    model = RandomForestClassifier(n_estimators=300)"
    # a misremembered line the block keeps stays as the current value has it; the lines it adds
    # or changes go in (Qwen 1.5B kept ``transformer = ...`` for ``return ...``: None returned)
    body = ("def preprocess(dataset, columns):\n    X = dataset.X\n    return ColumnTransformer([\n"
            "        (\"numeric\", SimpleImputer(strategy=\"median\"), numeric),\n"
            "        (\"categorical\", OneHotEncoder(handle_unknown=\"ignore\"), categorical),\n"
            "    ])\n")
    search = ("    transformer = ColumnTransformer([\n        (\"numeric\", SimpleImputer(strategy=\"median\"), numeric),\n"
              "  (\"categorical\", OneHotEncoder(handle_unknown=\"ignore\"), categorical),\n    ])\n")
    added = search.replace("    ])\n", "        (\"bool\", OneHotEncoder(), [\"CryoSleep\"]),\n    ])\n")
    merged = body.replace("    ])\n", "        (\"bool\", OneHotEncoder(), [\"CryoSleep\"]),\n    ])\n")
    assert apply_edit(body, search, added, "preprocess", 1) == merged
    # ... also where the block's copy of a kept line has a comment the current line lacks
    commented = (search.replace("    ])", "    ])  # done"), added.replace("    ])", "    ])  # done"))
    assert apply_edit(body, *commented, "preprocess", 1) == merged
    # two places equally near: refused, as is a short SEARCH that is only approximately there
    twice = "a_long_name = compute(1)\nb = 2\na_long_name = compute(2)\n"
    with pytest.raises(InvalidProposal, match="matches nothing"):
        apply_edit(twice, "a_long_name = compute(3)\n", "x = 0\n", "f", 1)
    with pytest.raises(InvalidProposal, match="matches nothing"):
        apply_edit("return x\n", "return y\n", "return z\n", "f", 1)
    # a block naming preprocess whose lines are in train: applied to train
    spec = ArtifactSpec((Parameter("preprocess", "code", "p"), Parameter("train", "code", "t")))
    version = ArtifactVersion({"preprocess": "def preprocess(df):\n    return df\n", "train": current}, 0)
    raw = ("<reasoning>\nmore trees\n</reasoning>\n<<<<<<< SEARCH preprocess\n    model.fit(X, y)\n"
           "=======\n    model.fit(X.fillna(0), y)\n>>>>>>> REPLACE\n")
    parsed = DiffFormat().parse(raw, spec, version)
    assert list(parsed.values) == ["train"] and "model.fit(X.fillna(0), y)" in parsed.values["train"]


def test_every_format_asks_for_code_with_a_worked_example_and_constrains_the_llm():
    for fmt in (JsonFormat(), TaggedFormat(), DiffFormat()):
        text = fmt.instructions(SPEC)
        assert "Example" in text and "greet" in text and "description" in text
    assert "json_schema" in JsonFormat().request(SPEC)
    grammar = TaggedFormat().request(SPEC)["grammar"]
    assert '"<train_model>\\n"' in grammar and "root ::=" in grammar
    # the reasoning ends after a few lines, so a rambling model still reaches the value block
    assert 'root ::= "<reasoning>\\n" reasoning "</reasoning>\\n"' in grammar
    assert "reasoning ::= [^<>=`\\n] [^\\n]{0,600} \"\\n\" rline{0,3}" in grammar
    # a free value has no runs of more than two blank lines (Qwen 1.5B emitted 2,000 newlines)
    assert 'body ::= ( "\\n"{0,2} line )* "\\n"{0,2}' in grammar
    diff = DiffFormat().request(SPEC)["grammar"]
    assert '"<<<<<<< SEARCH "' in diff and "edit{1,8}" in diff  # one block repeated to the limit
    assert '"\\n" sline dline* "=======' in diff  # the SEARCH part is never empty


def test_a_prompt_only_artifact_gets_a_prompt_example_with_its_own_placeholders_only():
    # SmolLM2 copied the code example's {name} into BBEH's prompt: 1 of 5 quickstart steps lost
    spec = ArtifactSpec((Parameter("prompt", "prompt", "Template.", placeholders=("{question}",)),))
    current = ArtifactVersion({"prompt": "Q: {question}"}, step=0)
    for fmt in (JsonFormat(), TaggedFormat()):
        text = fmt.instructions(spec)
        assert "prompt parameter named prompt" in text and "{question}" in text
        assert "{name}" not in text and "greet" not in text
    # a prompt value's lines are bounded too: the whole answer fits a small token budget
    assert "pbody0 ::= pline{0," in TaggedFormat().request(spec)["grammar"]
    # the example itself, copied as the answer, is a valid proposal
    example = TaggedFormat().instructions(spec).split("named prompt:\n", 1)[1]
    answer = TaggedFormat().parse(example, spec, current)
    assert validate_value(spec.parameters[0], answer.values["prompt"])[0].count("{question}") == 1


# --- prompt placeholders ---------------------------------------------------------------------
def test_a_prompt_without_its_input_gets_it_appended_and_unknown_placeholders_are_refused():
    value, repairs = validate_value(PROMPT, "Think step by step.")
    assert value == "Think step by step.\n\n{question}" and repairs
    assert validate_value(PROMPT, "Q: {question}\nA:") == ("Q: {question}\nA:", ())
    with pytest.raises(InvalidProposal, match=r"unknown placeholder\(s\) \{answer\}"):
        validate_value(PROMPT, "{question} {answer}")
    assert validate_value(PROMPT, 'Reply as JSON {"a": 1}. {question}')[1] == ()  # not a placeholder
    mlflow_style = Parameter("p", "prompt", "t", placeholders=("{{ question }}",))
    assert validate_value(mlflow_style, "Hi {{question}}")[1] == ()
    with pytest.raises(InvalidProposal, match="unknown placeholder"):
        validate_value(mlflow_style, "Hi {{question}} {{tone}}")


# --- repair ----------------------------------------------------------------------------------
def test_diff_lines_copied_from_a_repairs_numbered_excerpt_lose_the_gutter():
    current = ("def preprocess(df):\n    cols = [\n        'a',\n    ]\n    return df[cols]\n")
    # as Qwen 1.5B wrote them: re-indented, marker kept on one line, beside plain lines
    raw = ("<reasoning>\nadd b\n</reasoning>\n<<<<<<< SEARCH preprocess\n    cols = [\n"
           "      3 |         'a',\n>    4 |     ]\n=======\n    cols = [\n      3 |         'a', 'b',\n"
           "    ]\n>>>>>>> REPLACE\n")
    spec = ArtifactSpec((Parameter("preprocess", "code", "p"),))
    parsed = DiffFormat().parse(raw, spec, ArtifactVersion({"preprocess": current}, 0))
    assert parsed.values["preprocess"] == current.replace("'a',", "'a', 'b',")
    # a block whose SEARCH lines are the current value's as written is left alone, "1 | 2" included
    odd = "def f(x):\n    return (x\n    1 | 2)\n"
    raw = "<<<<<<< SEARCH f\n    1 | 2)\n=======\n    1 | 4)\n>>>>>>> REPLACE\n"
    spec = ArtifactSpec((Parameter("f", "code", "f"),))
    assert DiffFormat().parse(raw, spec, ArtifactVersion({"f": odd}, 0)).values["f"] == odd.replace("| 2", "| 4")


def _edit(search: str, replace: str) -> str:
    return (f"<reasoning>\nr\n</reasoning>\n<<<<<<< SEARCH train_model\n{search}\n=======\n"
            f"{replace}\n>>>>>>> REPLACE\n")


def test_a_diff_repair_asks_for_lines_of_the_current_value_not_complete_values():
    missed = _edit("    return 0", "    return 2")
    llm = ScriptedLLM([missed, _edit("    return 1", "    return 2")])
    [proposal] = Optimizer(llm, edit_format="diff", repair_attempts=1).propose_candidates(
        [{"role": "user", "content": "ctx"}], SPEC, CURRENT, seeds=[0])
    assert proposal.valid and proposal.values["train_model"].endswith("return 2\n")
    followup = llm.calls[1]["messages"][-1]["content"]
    assert "SEARCH block 1 matches nothing" in followup and "complete values" not in followup
    assert "each SEARCH part copies lines of the current value" in followup


def test_diff_blocks_that_apply_are_kept_and_the_others_noted_no_op_blocks_skipped():
    current = ArtifactVersion({"train_model": "def train_model(dataset):\n    a = 1\n    return a\n"}, 0)
    noop = "<<<<<<< SEARCH train_model\n    return a\n=======\n    return a\n>>>>>>> REPLACE\n"
    raw = (_edit("    a = 1", "    a = 2") + noop * 3
           + "<<<<<<< SEARCH train_model\n    predictions = [false]\n=======\n    predictions = [False]\n"
             ">>>>>>> REPLACE\n")
    llm = ScriptedLLM([raw])
    [proposal] = Optimizer(llm, edit_format="diff").propose_candidates(
        [{"role": "user", "content": "ctx"}], SPEC, current, seeds=[0])
    assert proposal.valid and proposal.values["train_model"] == current.values["train_model"].replace("1", "2")
    assert proposal.repairs == ("left out edit block: train_model: SEARCH block 5 matches nothing in "
                                "the current value",)
    # nothing applies: the first miss is the reason; only no-op blocks: said so
    with pytest.raises(InvalidProposal, match="SEARCH block 1 matches nothing"):
        DiffFormat().parse(_edit("    b = 1", "    b = 2") + noop, SPEC, current)
    with pytest.raises(InvalidProposal, match="every edit block changes nothing") as nothing:
        DiffFormat().parse(noop, SPEC, current)
    assert nothing.value.repeat  # its repair is drawn at repeat_temperature


def test_code_that_fails_after_parsing_is_repaired_from_that_code_or_by_a_new_edit():
    # a syntax error, then the quick run: each repair shows the code that failed, and its edits
    # apply to that code (both changes are kept); an edit of the current version is read too
    def precheck(values):
        code = values["train_model"]
        return None if "import xgboost" in code or "xgb" not in code else \
            "NameError: name 'xgb' is not defined\n  line 2: return xgb.f(2)"

    answers = [_edit("    return 1", "    return xgb.f((2)"),
               _edit("    return xgb.f((2)", "    return xgb.f(2)"),
               _edit("    return xgb.f(2)", "    import xgboost as xgb\n    return xgb.f(2)")]
    llm = ScriptedLLM(answers)
    [proposal] = Optimizer(llm, edit_format="diff", repair_attempts=2).propose_candidates(
        [{"role": "user", "content": "ctx"}], SPEC, CURRENT, seeds=[0], precheck=precheck)
    assert [a.invalid_reason for a in proposal.attempts] == [
        "train_model: SyntaxError at line 2: '(' was never closed",
        "the new version fails a quick run: NameError: name 'xgb' is not defined", None]
    assert proposal.values["train_model"] == ("def train_model(dataset):\n    import xgboost as xgb"
                                              "\n    return xgb.f(2)\n")
    second, third = (llm.calls[i]["messages"][-1]["content"] for i in (1, 2))
    assert "<train_model>\ndef train_model(dataset):\n    return xgb.f((2)\n</train_model>" in second
    assert "    return xgb.f(2)\n</train_model>" in third and "line 2: return xgb.f(2)" in third
    assert "copies lines of the values to fix shown just above" in third
    # a repair that edits the current version instead is a new answer, and is read as one
    llm = ScriptedLLM([answers[0], _edit("    return 1", "    return 3")])
    [proposal] = Optimizer(llm, edit_format="diff", repair_attempts=1).propose_candidates(
        [{"role": "user", "content": "ctx"}], SPEC, CURRENT, seeds=[0], precheck=precheck)
    assert proposal.valid and proposal.values["train_model"].endswith("    return 3\n")


def test_an_invalid_answer_goes_back_with_its_reason_and_the_offending_lines():
    broken = "<reasoning>\nfix\n</reasoning>\n<train_model>\ndef train_model(dataset):\n    return (1\n</train_model>"
    fixed = "<reasoning>\nfix\n</reasoning>\n<train_model>\ndef train_model(dataset):\n    return 2\n</train_model>"
    llm = ScriptedLLM([broken, fixed])
    optimizer = Optimizer(llm, edit_format="tagged", repair_attempts=2)
    [proposal] = optimizer.propose_candidates([{"role": "user", "content": "ctx"}], SPEC, CURRENT, seeds=[1])
    assert proposal.valid and proposal.values["train_model"] == "def train_model(dataset):\n    return 2\n"
    first, second = proposal.attempts
    assert first.invalid_reason.startswith("train_model: SyntaxError at line 2") and second.invalid_reason is None
    followup = llm.calls[1]["messages"]
    assert followup[0]["content"] == "ctx" and [m["role"] for m in followup] == ["user", "user"]
    assert "could not be used: train_model: SyntaxError" in followup[1]["content"]
    assert ">    2 |     return (1" in followup[1]["content"]
    assert "<reasoning>" not in followup[1]["content"]  # the answer itself is not sent back
    assert llm.calls[1]["grammar"] == llm.calls[0]["grammar"] is not None


def test_a_repair_that_fails_as_the_answer_before_it_did_is_redrawn_at_the_repeat_temperature():
    # Qwen 1.5B kept the same broken line of preprocess through 3 answers on Spaceship Titanic
    broken = "<reasoning>\nfix\n</reasoning>\n<train_model>\ndef train_model(dataset):\n    return (1\n</train_model>"
    again = broken.replace("fix", "fixed now")  # other words, the same broken code
    fixed = "<reasoning>\nfix\n</reasoning>\n<train_model>\ndef train_model(dataset):\n    return 2\n</train_model>"
    llm = ScriptedLLM([broken, again, fixed])
    [proposal] = Optimizer(llm, edit_format="tagged", repair_attempts=2,
                           repeat_temperature=1.1).propose_candidates(
        [{"role": "user", "content": "ctx"}], SPEC, CURRENT, seeds=[0])
    assert proposal.valid and proposal.values["train_model"].endswith("return 2\n")
    first, second, _ = proposal.attempts
    assert first.invalid_reason == second.invalid_reason
    assert first.invalid_reason.startswith("train_model: SyntaxError at line 2")
    assert [a.temperature for a in proposal.attempts] == [0.7, 0.7, 1.1]
    # a different failure of the repair is a new mistake: drawn like the first answer
    other = broken.replace("return (1", "return [1")
    llm = ScriptedLLM([broken, other, fixed])
    [proposal] = Optimizer(llm, edit_format="tagged", repair_attempts=2,
                           repeat_temperature=1.1).propose_candidates(
        [{"role": "user", "content": "ctx"}], SPEC, CURRENT, seeds=[0])
    assert proposal.attempts[0].invalid_reason != proposal.attempts[1].invalid_reason
    assert [c["temperature"] for c in llm.calls] == [0.7, 0.7, 0.7]


def test_repairs_are_new_answers_to_the_context_listing_every_earlier_failure_whole_lines():
    # Qwen 1.5B resent its own quoted answer word for word; the request quotes only the lines
    # that matter, cut at a line boundary and unmarked (it copied an inline "[...]" marker)
    body = "\n".join(f"    x{i} = {i}" for i in range(600))
    broken = (f"<reasoning>\nr\n</reasoning>\n<train_model>\ndef train_model(dataset):\n{body}"
              "\n    return (1\n</train_model>")
    same = f"<reasoning>\nr\n</reasoning>\n<train_model>\n{CURRENT.values['train_model']}\n</train_model>"
    fixed = "<reasoning>\nr\n</reasoning>\n<train_model>\ndef train_model(dataset):\n    return 2\n</train_model>"
    llm = ScriptedLLM([broken, same, fixed])
    [proposal] = Optimizer(llm, edit_format="tagged", repair_attempts=2,
                           repeat_temperature=1.1).propose_candidates(
        [{"role": "user", "content": "ctx"}], SPEC, CURRENT, seeds=[0])
    assert proposal.valid and len(proposal.attempts) == 3
    # a repair of a syntax error is drawn like the first answer; the repair of an answer that
    # changed nothing at repeat_temperature (Qwen 1.5B resent it at 0.7 with a new seed)
    assert [c["temperature"] for c in llm.calls] == [0.7, 0.7, 1.1]
    assert [a.temperature for a in proposal.attempts] == [0.7, 0.7, 1.1]
    assert [c["seed"] for c in llm.calls] == [0, 7, 14]
    second, third = llm.calls[1]["messages"], llm.calls[2]["messages"]
    assert len(second) == len(third) == 2 and third[0]["content"] == "ctx"
    assert "[...]" not in second[1]["content"] and len(second[1]["content"]) < 3500
    assert "proposal is identical to the current version" in third[1]["content"]
    assert "Earlier answers could not be used either:\n- train_model: SyntaxError" in third[1]["content"]
    assert proposal.attempts[2].followup == tuple(third[1:])


def test_a_candidate_failing_the_precheck_is_repaired_with_the_error_and_not_re_run():
    def answer(body):
        return f"<reasoning>\nr\n</reasoning>\n<train_model>\ndef train_model(dataset):\n    {body}\n</train_model>"
    runs = []

    def precheck(values):
        runs.append(values["train_model"])
        return "NameError: name 'xgb' is not defined\n  line 2: return xgb" if "xgb" in values["train_model"] else None

    llm = ScriptedLLM([answer("return xgb"), answer("return xgb"), answer("return 7")])
    [proposal] = Optimizer(llm, edit_format="tagged", repair_attempts=2).propose_candidates(
        [{"role": "user", "content": "ctx"}], SPEC, CURRENT, seeds=[0], precheck=precheck)
    assert [a.invalid_reason for a in proposal.attempts] == [
        "the new version fails a quick run: NameError: name 'xgb' is not defined",
        "proposal is identical to a proposal of this step that failed the quick run (precheck); "
        "propose a different change", None]
    assert "line 2: return xgb" in llm.calls[1]["messages"][-1]["content"]  # the detail goes back
    assert len(runs) == 2 and proposal.values["train_model"].endswith("return 7\n")  # not re-run


def test_a_task_quick_fix_is_prechecked_and_adopted_as_a_repair_without_asking_the_optimizer():
    def precheck(values):
        code = values["train_model"]
        missing = [n for n in ("np", "pd") if f"{n}." in code and f"import {n}" not in code]
        return f"NameError: name '{missing[0]}' is not defined\n  line 2" if missing else None

    def quick_fix(values, problem):  # one import per call, as a task would add them
        if not problem.startswith("NameError"):
            return None
        name = problem.split("'")[1]
        code = values["train_model"].replace("(dataset):\n", f"(dataset):\n    import {name}\n", 1)
        return {**values, "train_model": code}, f"added import {name}"

    llm = ScriptedLLM([_edit("    return 1", "    return np.f(pd.g())")])
    [proposal] = Optimizer(llm, edit_format="diff", repair_attempts=1).propose_candidates(
        [{"role": "user", "content": "ctx"}], SPEC, CURRENT, seeds=[0], precheck=precheck,
        quick_fix=quick_fix)
    assert proposal.valid and len(llm.calls) == 1
    assert proposal.repairs == ("added import np", "added import pd")
    assert proposal.values["train_model"] == ("def train_model(dataset):\n    import pd\n    import np\n"
                                              "    return np.f(pd.g())\n")
    # a fix that does not make the quick run pass goes back to the optimizer as a repair
    llm = ScriptedLLM([_edit("    return 1", "    return np.f()"), _edit("    return np.f()", "    return 5")])
    [proposal] = Optimizer(llm, edit_format="diff", repair_attempts=1).propose_candidates(
        [{"role": "user", "content": "ctx"}], SPEC, CURRENT, seeds=[0], precheck=precheck,
        quick_fix=lambda values, problem: ({"train_model": values["train_model"] + "# np.\n"}, "no"))
    assert proposal.valid and proposal.values["train_model"].endswith("return 5\n")
    assert proposal.attempts[0].invalid_reason.startswith("the new version fails a quick run: NameError")
    # a fix that gets the quick run past its problem is kept, and the next problem goes back
    # with the fixed code
    def later(values):
        return precheck(values) or ("ValueError: bad shape" if "f(1)" in values["train_model"] else None)

    llm = ScriptedLLM([_edit("    return 1", "    return np.f(1)"), _edit("    return np.f(1)", "    return np.f(2)")])
    [proposal] = Optimizer(llm, edit_format="diff", repair_attempts=1).propose_candidates(
        [{"role": "user", "content": "ctx"}], SPEC, CURRENT, seeds=[0], precheck=later,
        quick_fix=quick_fix)
    assert proposal.attempts[0].invalid_reason == "the new version fails a quick run: ValueError: bad shape"
    assert "    import np\n    return np.f(1)\n</train_model>" in llm.calls[1]["messages"][-1]["content"]
    assert proposal.valid and proposal.values["train_model"].endswith("import np\n    return np.f(2)\n")


def test_an_answer_in_another_format_is_understood_and_the_repair_recorded():
    as_json = json.dumps({"reasoning": "r", "train_model": "def train_model(dataset):\n    return 4\n"})
    optimizer = Optimizer(ScriptedLLM([as_json]), edit_format="tagged", repair_attempts=0)
    [proposal] = optimizer.propose_candidates([{"role": "user", "content": "c"}], SPEC, CURRENT, seeds=[0])
    assert proposal.valid and proposal.values["train_model"].endswith("return 4\n")
    assert "answer parsed as json (asked for tagged)" in proposal.repairs
    # an answer no format can read keeps the asked format's reason
    optimizer = Optimizer(ScriptedLLM(["just prose"]), edit_format="tagged", repair_attempts=0)
    [proposal] = optimizer.propose_candidates([{"role": "user", "content": "c"}], SPEC, CURRENT, seeds=[0])
    assert not proposal.valid and proposal.invalid_reason.startswith("answer has no block <train_model>")


def test_the_defaults_are_the_measured_ones():
    config = LoopConfig(project="toy")
    assert (config.edit_format, config.repair_attempts) == ("tagged", 2)


def test_an_answer_cut_at_the_token_limit_is_never_adopted():
    class Cut(ScriptedLLM):
        def complete(self, messages, **kwargs):
            done = super().complete(messages, **kwargs)
            return Completion(done.text, "cut", finish_reason="length")

    whole = "<reasoning>\nr\n</reasoning>\n<train_model>\ndef train_model(dataset):\n    return 3\n</train_model>"
    optimizer = Optimizer(Cut([whole, whole]), edit_format="tagged", repair_attempts=1)
    [proposal] = optimizer.propose_candidates([{"role": "user", "content": "c"}], SPEC, CURRENT, seeds=[0])
    assert not proposal.valid and "cut at the token limit" in proposal.invalid_reason
    assert len(proposal.attempts) == 2
    # a loop to the limit (what Qwen 1.5B's cut answers were) is named, whatever it cut off,
    # and its repair drawn at repeat_temperature
    loop = ("<<<<<<< SEARCH train_model\n    return 1\n=======\n    parts = [\n"
            + "".join(f'        FunctionTransformer(lambda x: x.str.split(" ").str[{i}]),\n'
                      for i in range(40)))
    llm = Cut([loop, whole])
    [proposal] = Optimizer(llm, edit_format="diff", repair_attempts=1,
                           repeat_temperature=1.0).propose_candidates(
        [{"role": "user", "content": "c"}], SPEC, CURRENT, seeds=[0])
    assert proposal.attempts[0].invalid_reason == (
        "answer was cut at the token limit (768 tokens): it repeated a line like "
        '`FunctionTransformer(lambda x: x.str.split(" ").str[16]),` until the limit; write a '
        "shorter answer that says each thing once")
    assert [c["temperature"] for c in llm.calls] == [0.7, 1.0]


def test_a_proposal_equal_to_any_evaluated_version_is_refused_and_reasked_not_rescored():
    # the loop proposes alpha (accepted), then bravo (rejected), then alpha again twice
    loop, task, llm = make_loop([answer("india"), answer("start"), answer("india"), answer("kilo")],
                                steps=2, repair_attempts=2, acceptance="always")
    result = loop.run()
    second = result.steps[1]
    assert second.valid and second.proposal == {"prompt": "kilo"}
    reasons = [a.invalid_reason for a in second.candidates[0].attempts]
    assert reasons[0].startswith("proposal is identical to v0-") and "initial at step 0" in reasons[0]
    assert reasons[1].startswith("proposal is identical to the current version v1-") and reasons[2] is None
    pairs = [(vid, example) for vid, ids in task.calls for example in ids]
    assert len(pairs) == len(set(pairs))  # no version is evaluated twice on the same example


# --- acceptance ties ---------------------------------------------------------------------------
def test_the_tie_rule_and_the_margin():
    assert not accept("improve", 0.5, 0.5) and accept("improve", 0.51, 0.5)
    assert accept("no_worse", 0.5, 0.5) and not accept("no_worse", 0.49, 0.5)
    assert not accept("improve", 0.55, 0.5, margin=0.1) and accept("no_worse", 0.45, 0.5, margin=0.1)
    assert accept("always", 0.0, 1.0)


# --- several candidates per step -------------------------------------------------------------
def test_k_candidates_are_all_versions_and_the_best_on_the_batch_goes_through_acceptance():
    words = WordTask(train=["alpha", "bravo"], val=["alpha", "bravo"], test=["alpha"])
    loop, task, llm = make_loop([answer("alpha"), answer("alpha bravo"), answer("nothing")],
                                task=words, steps=1, candidates_per_step=3, acceptance="improve")
    result = loop.run()
    [step] = result.steps
    # (a list-scripted LLM hands answers out in the order the concurrent calls arrive)
    scores = {c.index: c.batch_score for c in step.candidates}
    assert sorted(scores.values()) == [0.0, 0.5, 1.0]
    best = max(scores, key=scores.get)
    assert step.candidate_id == step.candidates[best].version_id and step.accepted
    statuses = sorted((v.status, v.candidate == best) for v in result.versions[1:])
    assert statuses == [("accepted", True), ("rejected", False), ("rejected", False)]
    assert len({c["seed"] for c in llm.calls}) == 3  # distinct seeds
    assert all(v.version.parent_id == result.versions[0].version.version_id for v in result.versions[1:])


# --- parameter selection (one parameter per step, in turn) ---------------------------------
class TwoPrompts(WordTask):
    """Two prompt parameters; a trial scores 1 when either mentions its word."""
    spec = ArtifactSpec((Parameter("first", "prompt", "Some words."),
                         Parameter("second", "prompt", "More words.")))

    def evaluate(self, version, examples):
        words = (version.values["first"] + " " + version.values["second"]).split()
        return [Trial(e.id, e.input, " ".join(words), float(e.input in words), "") for e in examples]


def _two_prompt_loop(responses, **config):
    config = LoopConfig(**{"project": "toy", "task": "words", "init": "toy", "steps": len(responses),
                           "batch_size": 2, "acceptance": "always", "edit_format": "tagged",
                           "repair_attempts": 0, **config})
    llm = ScriptedLLM(responses)
    task = TwoPrompts(train=["alpha", "bravo"], val=["alpha", "bravo", "charlie"], test=["alpha"])
    loop = LearningLoop(config, task, Optimizer.from_config(config, llm),
                        {"first": "start", "second": "start"})
    return loop, llm


def test_round_robin_edits_one_parameter_per_step_in_turn_and_shows_the_others_frozen():
    tagged = "<reasoning>\nr\n</reasoning>\n<{0}>\n{1}\n</{0}>\n"
    loop, llm = _two_prompt_loop([tagged.format("first", "alpha"),
                                  # a block for the parameter that is not this step's is ignored
                                  tagged.format("first", "nope") + tagged.format("second", "bravo"),
                                  tagged.format("first", "alpha charlie")],
                                 parameter_selection="round_robin")
    result = loop.run()
    assert [s.editable for s in result.steps] == [("first",), ("second",), ("first",)]
    assert [s.proposal for s in result.steps] == [{"first": "alpha"}, {"second": "bravo"},
                                                  {"first": "alpha charlie"}]
    assert result.selected.values == {"first": "alpha charlie", "second": "bravo"}
    second = llm.calls[1]
    user = second["messages"][-1]["content"]
    trainable, frozen = user.split("# Frozen parameters")[0], user.split("# Frozen parameters")[1]
    assert "## second (prompt)" in trainable and "## first" not in trainable
    assert "## first (prompt)" in frozen.split("# Recent versions")[0]
    assert "<second>" in second["grammar"] and "<first>" not in second["grammar"]
    # all: every step may change both, and the step record says so
    loop, llm = _two_prompt_loop([tagged.format("first", "alpha") + tagged.format("second", "bravo")])
    [step] = loop.run().steps
    assert step.editable == ("first", "second") and step.proposal == {"first": "alpha", "second": "bravo"}
    with pytest.raises(ConfigError, match=r"^parameter_selection: must be one of all, round_robin"):
        LoopConfig(project="toy", parameter_selection="random")


# --- selection -------------------------------------------------------------------------------
def _validated(history, version_id, scores):
    version = ArtifactVersion({"p": version_id}, 1)
    history.record(version, [Trial(e, e, "", s, "") for e, s in scores.items()], validation=True)
    return version


def test_pareto_frontier_and_selection_by_coverage():
    history = History()
    a = _validated(history, "a", {"e1": 1.0, "e2": 0.0, "e3": 0.0})
    b = _validated(history, "b", {"e1": 0.0, "e2": 1.0, "e3": 1.0})
    c = _validated(history, "c", {"e1": 0.5, "e2": 0.5, "e3": 0.5})
    assert pareto_frontier([a, b, c], history) == {a.version_id: 1, b.version_id: 2}
    picks = [select_parent("pareto", current=c, best=b, adopted=[a, b, c], history=history,
                           rng=random.Random(seed)).version_id for seed in range(200)]
    assert set(picks) == {a.version_id, b.version_id} and 0.55 < picks.count(b.version_id) / 200 < 0.8
    assert select_parent("best", current=c, best=b, adopted=[a, b, c], history=history, rng=random.Random()) is b
    assert select_parent("current", current=c, best=b, adopted=[a, b, c], history=history, rng=random.Random()) is c


def test_selection_best_improves_the_best_version_after_a_worse_one_was_adopted():
    loop, _, _ = make_loop([answer("india juliet kilo"), answer("alpha"), answer("india lima")],
                           steps=3, selection="best", acceptance="always")
    result = loop.run()
    assert [s.selection for s in result.steps] == ["best"] * 3
    best_after_1 = result.steps[0].candidate_id
    assert result.steps[2].current_id == best_after_1  # step 2 adopted "alpha", step 3 improves the best


# --- evaluation cache --------------------------------------------------------------------------
def test_unchanged_versions_are_not_evaluated_again_and_resume_hits_the_disk_cache(tmp_path):
    from mlflow_genopt.evaluation import EvalCache, Evaluator

    config = LoopConfig(project="toy", seed=0)
    task = WordTask()
    version = ArtifactVersion({"prompt": "alpha"}, 0)
    cache = EvalCache(tmp_path)
    evaluate = Evaluator(task, config, History(), cache)
    first = evaluate(version, task.examples("train")[:3], "batch", 1)
    again = evaluate(version, task.examples("train")[:4], "batch", 2)
    assert [t.score for t in again[:3]] == [t.score for t in first] and evaluate.cache_hits == 3
    assert [ids for _, ids in task.calls] == [tuple(e.id for e in task.examples("train")[:3]),
                                               (task.examples("train")[3].id,)]
    fresh_task = WordTask()  # a new process: the disk cache answers
    Evaluator(fresh_task, config, History(), EvalCache(tmp_path))(version, task.examples("train")[:4], "batch", 1)
    assert fresh_task.calls == []
    other = Evaluator(WordTask(), config.replace(seed=1), History(), EvalCache(tmp_path))
    other(version, task.examples("train")[:1], "batch", 1)
    assert other.task.calls  # another task fingerprint: evaluated
