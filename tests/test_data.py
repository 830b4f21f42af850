import json
import re
from pathlib import Path

import pytest

from eksft.data import (
    IGNORE_INDEX, DataError, Row, read_rows, to_prompt_answer, to_sft_messages, tokenize_conversation,
    tokenize_dataset,
)
from eksft.data.generators import generate, reduction_steps

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3*3?"},
    {"role": "assistant", "content": "It is \\boxed{9}."},
]


def test_chat_template_and_assistant_only_mask_multi_turn(tiny_tokenizer):
    ex = tokenize_conversation(tiny_tokenizer, MULTI_TURN, max_length=4096)
    text = tiny_tokenizer.decode(ex["input_ids"])
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3*3?<|im_end|>\n"
        "<|im_start|>assistant\nIt is \\boxed{9}.<|im_end|>\n"
    )
    # Trained tokens: exactly the two assistant contents, each with its end-of-turn token.
    trained_runs, run = [], []
    for tok, label in zip(ex["input_ids"], ex["labels"]):
        if label != IGNORE_INDEX:
            assert label == tok
            run.append(tok)
        elif run:
            trained_runs.append(tiny_tokenizer.decode(run))
            run = []
    assert trained_runs == ["4<|im_end|>", "It is \\boxed{9}.<|im_end|>"]
    assert ex["truncated"] is False


def test_mask_on_real_template_with_default_system_prompt(embedded_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    ex = tokenize_conversation(tok, MULTI_TURN[1:], max_length=4096)
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "4<|im_end|>It is \\boxed{9}.<|im_end|>"
    assert "SmolLM" in tok.decode(ex["input_ids"])  # the template's default system prompt is kept, untrained


def test_truncation_is_counted_and_empty_examples_dropped(tiny_tokenizer):
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 100}]
    long_prompt = [{"role": "user", "content": "y" * 100}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    examples, stats = tokenize_dataset(tiny_tokenizer, [long_answer, long_prompt, short], max_length=40,
                                       origins=["a: row 1", "a: row 2", "a: row 3"])
    assert stats.examples == 3
    assert stats.truncated == 2 and stats.truncated_rows == ["a: row 1", "a: row 2"]
    assert stats.dropped == 1  # the long prompt leaves no assistant token within 40
    assert len(examples) == 2 and all(len(e["input_ids"]) <= 40 for e in examples)
    assert stats.tokens == sum(len(e["input_ids"]) for e in examples)
    assert stats.trained_tokens == sum(sum(lab != IGNORE_INDEX for lab in e["labels"]) for e in examples)
    assert "truncated 2" in stats.summary()


def test_sft_formats_give_the_same_conversation():
    expect = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    rows = {
        "messages": {"messages": expect},
        "sharegpt": {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        "alpaca": {"instruction": "Q", "input": "", "output": "A"},
        "problem_solution": {"problem": "Q", "solution": "A"},
    }
    for fmt, data in rows.items():
        assert to_sft_messages(Row("f", 1, data), "auto") == expect, fmt
        assert to_sft_messages(Row("f", 1, data), fmt) == expect, fmt
    alpaca = to_sft_messages(Row("f", 1, {"instruction": "Q", "input": "ctx", "output": "A"}), "alpaca", system_prompt="S")
    assert alpaca == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q\n\nctx"}, {"role": "assistant", "content": "A"}]
    ps = to_sft_messages(Row("f", 1, {"problem": "Q", "solution": "A"}), instruction="Box it.")
    assert ps[0] == {"role": "user", "content": "Q\nBox it."}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_malformed_rows_name_file_row_and_field(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [{"problem": "1+1", "solution": "2"}, {"problem": "2+2"}])
    rows = read_rows(str(f))
    to_sft_messages(rows[0])
    with pytest.raises(DataError, match=r"train\.jsonl: row 2: missing field 'solution'"):
        to_sft_messages(rows[1], "problem_solution")
    with pytest.raises(DataError, match=r"train\.jsonl: row 2: cannot tell the row format.*\['problem'\]"):
        to_sft_messages(rows[1])

    bad_json = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "a", "answer": "1"}, '{"problem": "b", '])
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: not valid JSON"):
        read_rows(str(bad_json))

    wrong_type = write_jsonl(tmp_path / "wt.jsonl", [{"problem": "a", "answer": [1]}])
    with pytest.raises(DataError, match=r"wt\.jsonl: row 1: field 'answer' must be a string or a number"):
        to_prompt_answer(read_rows(str(wrong_type))[0])

    role = write_jsonl(tmp_path / "role.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(DataError, match=r"role\.jsonl: row 1: message 0: field 'from' is 'bot'"):
        to_sft_messages(read_rows(str(role))[0])

    no_assistant = write_jsonl(tmp_path / "na.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match=r"na\.jsonl: row 1: no assistant message to train on in field 'messages'"):
        to_sft_messages(read_rows(str(no_assistant))[0])

    not_obj = write_jsonl(tmp_path / "no.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"no\.jsonl: row 1: expected a JSON object"):
        read_rows(str(not_obj))

    with pytest.raises(DataError, match="file not found"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_field_mapping_and_prompt_answer(tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [{"question": "How many?", "final": 18}])
    row = read_rows(str(f), fields={"problem": "question", "answer": "final"})[0]
    pa = to_prompt_answer(row, instruction="Box it.")
    assert pa == {"prompt": [{"role": "user", "content": "How many?\nBox it."}], "answer": "18", "problem": "How many?"}
    with pytest.raises(DataError, match=r"g\.jsonl: row 1: missing field 'nope' \(mapped to 'answer'\)"):
        read_rows(str(f), fields={"answer": "nope"})


def test_parquet_and_json_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": "1"}, {"problem": "q", "answer": "2"}]), tmp_path / "d.parquet")
    rows = read_rows(str(tmp_path / "d.parquet"), num_examples=1)
    assert [r.data for r in rows] == [{"problem": "p", "answer": "1"}] and rows[0].where().endswith("d.parquet: row 1")
    (tmp_path / "d.json").write_text(json.dumps([{"problem": "p", "answer": "1"}]))
    assert read_rows(str(tmp_path / "d.json"))[0].data["answer"] == "1"


@pytest.mark.parametrize("name", ["arithmetic", "multistep", "gsm", "mix"])
def test_embedded_generators_give_exact_answers_and_boxed_demonstrations(name):
    rows = generate(name, 12, seed=3)
    assert len(rows) == 12
    assert rows == generate(name, 12, seed=3)  # deterministic
    for r in rows:
        assert r["solution"].rstrip().endswith(f"\\boxed{{{r['answer']}}}.")
        assert r["problem"] and r["answer"]
    if name in ("arithmetic", "multistep"):
        for r in rows:
            expr = r["problem"].removeprefix("Calculate ").rstrip(".")
            # The row's answer comes from reduction_steps; check it against Python's own parse of the expression.
            assert r["answer"] == str(evaluate_integer_expression(expr)) == reduction_steps(expr)[-1]


def evaluate_integer_expression(expr: str) -> int:
    """+, -, * and parentheses over integers, via the ast (an independent check of the generator's answers)."""
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.USub: operator.neg}

    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.operand))
        raise ValueError(f"unexpected {ast.dump(node)} in {expr!r}")

    return walk(ast.parse(expr, mode="eval").body)


def test_reduction_steps_by_hand():
    assert reduction_steps("( 2 + 3 ) * 4") == ["(2 + 3) * 4", "5 * 4", "20"]
    assert reduction_steps("85 - -82 + 3") == ["85 - -82 + 3", "167 + 3", "170"]
    assert reduction_steps("2 + 3 * 4") == ["2 + 3 * 4", "2 + 12", "14"]
    assert reduction_steps("-0 + 5") == ["-0 + 5", "0 + 5", "5"]
    assert reduction_steps("- -8") == ["--8", "8"]
    with pytest.raises(ValueError):
        reduction_steps("2 ** 3")


def test_unknown_embedded_generator_is_clear():
    with pytest.raises(ValueError, match=r"unknown embedded generator 'calc' \(available: arithmetic, multistep, gsm, mix\)"):
        read_rows("embedded:calc")


FIXTURES = Path(__file__).resolve().parent / "fixtures"
OPENR1 = FIXTURES / "openr1_math_rows.jsonl"  # made-up rows in OpenR1-Math-220k's full schema (default config, train)
AUTHORS = FIXTURES / "sharegpt_role_value.json"  # made-up rows in the EKSFT authors' sup_3k_data.json shape
AUTHORS_TAGS = {"role_tag": "role", "content_tag": "value", "user_tag": "user", "assistant_tag": "assistant",
                "system_tag": "system"}


def data_config(**sft):
    from eksft.data.config import DataConfig, DataSource

    return DataConfig(sft=DataSource(**sft))


def test_openr1_math_rows_load_as_messages():
    from eksft.data import load_sft_conversations

    raw = [json.loads(line) for line in OPENR1.read_text(encoding="utf-8").splitlines()]
    for fmt in ("messages", "auto"):  # auto: `messages` comes before problem_solution in the detection order
        convs, origins = load_sft_conversations(data_config(source=str(OPENR1), format=fmt))
        assert len(convs) == len(raw) == 6
        assert origins[0].endswith("openr1_math_rows.jsonl: row 1")
        for conv, row in zip(convs, raw):
            assert conv == row["messages"]  # the R1 trace, not the short `solution`; the other fields are ignored
            assert conv[1]["content"].startswith("<think>\n") and f"\\boxed{{{row['answer']}}}" in conv[1]["content"]
    assert any("≡" in c[1]["content"] for c in convs)  # unicode in a trace survives
    convs, _ = load_sft_conversations(data_config(source=str(OPENR1), format="problem_solution", num_examples=1))
    assert convs[0][1]["content"] == raw[0]["solution"]


def test_authors_sharegpt_file_with_role_value_tags():
    from eksft.data import load_sft_conversations

    raw = json.loads(AUTHORS.read_text(encoding="utf-8"))
    convs, origins = load_sft_conversations(data_config(source=str(AUTHORS), format="sharegpt", tags=AUTHORS_TAGS))
    assert convs == [[{"role": m["role"], "content": m["value"]} for m in r["conversations"]] for r in raw]
    assert [c[0]["role"] for c in convs] == ["user", "system", "user", "user"]
    assert origins[1].endswith("sharegpt_role_value.json: row 2")
    # Without tags the reader looks for `from` and says so.
    with pytest.raises(DataError, match=r"sharegpt_role_value\.json: row 1: message 0: missing field 'from'; message has \['role', 'value'\]"):
        load_sft_conversations(data_config(source=str(AUTHORS), format="sharegpt"))


def test_sharegpt_tags_map_roles_and_defaults_stay_compatible():
    from eksft.data.config import ShareGPTTags

    custom = ShareGPTTags(role_tag="speaker", content_tag="text", user_tag="Q", assistant_tag="A", system_tag="S")
    row = Row("f", 1, {"conversations": [{"speaker": "S", "text": "s"}, {"speaker": "Q", "text": "q"}, {"speaker": "A", "text": "a"}]})
    assert to_sft_messages(row, "sharegpt", tags=custom) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    # LlamaFactory's defaults, spelled out, are strict; unset tags also take user/assistant (as before tags existed).
    assert ShareGPTTags().model_dump() == {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                                           "assistant_tag": "gpt", "system_tag": "system"}
    loose = Row("f", 1, {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]})
    assert to_sft_messages(loose, "sharegpt") == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DataError, match=r"f: row 1: message 0: field 'from' is 'user' \(allowed: human, gpt, system\)"):
        to_sft_messages(loose, "sharegpt", tags=ShareGPTTags())


def test_sharegpt_conversations_under_another_column_via_fields(tmp_path):
    from eksft.data import load_sft_conversations

    f = write_jsonl(tmp_path / "d.jsonl", [{"dialog": [{"role": "user", "value": "q"}, {"role": "assistant", "value": "a"}]}])
    convs, _ = load_sft_conversations(data_config(source=str(f), format="sharegpt", tags=AUTHORS_TAGS,
                                                  fields={"conversations": "dialog"}))
    assert convs == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]


def test_malformed_sharegpt_and_openr1_rows_name_file_row_and_field(tmp_path):
    from eksft.data import load_sft_conversations

    good = {"conversations": [{"role": "user", "value": "q"}, {"role": "assistant", "value": "a"}]}
    cases = {
        "wrong role tag": ({"conversations": [{"role": "user", "value": "q"}, {"role": "gpt", "value": "a"}]},
                           r"message 1: field 'role' is 'gpt' \(allowed: user, assistant, system\)"),
        "missing content tag": ({"conversations": [{"role": "user", "content": "q"}]},
                                r"message 0: missing field 'value'; message has \['content', 'role'\]"),
        "non-string content": ({"conversations": [{"role": "user", "value": "q"}, {"role": "assistant", "value": 42}]},
                               r"message 1: field 'value' must be a string, got int"),
    }
    for name, (bad, expect) in cases.items():
        f = tmp_path / "sup_3k_data.json"
        f.write_text(json.dumps([good, good, bad]))
        with pytest.raises(DataError, match=rf"{re.escape(str(f))}: row 3: {expect}"):
            load_sft_conversations(data_config(source=str(f), format="sharegpt", tags=AUTHORS_TAGS))

    rows = [json.loads(line) for line in OPENR1.read_text(encoding="utf-8").splitlines()[:2]]
    rows[1]["messages"] = rows[1]["messages"][:1]  # the problem without its R1 trace
    f = write_jsonl(tmp_path / "openr1.jsonl", rows)
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}: row 2: no assistant message to train on in field 'messages' \(roles: \['user'\]\)"):
        load_sft_conversations(data_config(source=str(f), format="messages"))


def test_random_selection_is_seeded_and_keeps_row_numbers(tmp_path):
    f = write_jsonl(tmp_path / "many.jsonl", [{"problem": f"p{i}", "answer": str(i)} for i in range(1, 51)])

    def pick(n, seed):
        rows = read_rows(str(f), num_examples=n, seed=seed, selection="random")
        for r in rows:  # the original row number stays with its row
            assert r.data["answer"] == str(r.index) and r.where() == f"{f}: row {r.index}"
        return [r.index for r in rows]

    a = pick(10, 0)
    assert len(a) == len(set(a)) == 10 and a == sorted(a) and set(a) <= set(range(1, 51))
    assert a == pick(10, 0)  # deterministic for a seed
    assert a != pick(10, 1)
    assert a == [3, 17, 20, 25, 26, 27, 31, 32, 33, 49]  # pinned (Python 3.11): a change in random.sample would show
    assert pick(50, 3) == pick(80, 3) == list(range(1, 51))  # N >= the rows: all of them
    assert [r.index for r in read_rows(str(f), num_examples=3)] == [1, 2, 3]  # selection "first"
    with pytest.raises(DataError, match="selection 'random' does not apply to an embedded generator"):
        read_rows("embedded:arithmetic", num_examples=3, selection="random")


def test_data_source_recipe_errors():
    from pydantic import ValidationError

    from eksft.data.config import DataSource

    with pytest.raises(ValidationError, match=r"tags: only for format: sharegpt \(this source has format: messages\)"):
        DataSource(source="x.jsonl", format="messages", tags=AUTHORS_TAGS)
    with pytest.raises(ValidationError, match=r"tags: only for format: sharegpt \(this source has format: auto\)"):
        DataSource(source="x.jsonl", tags={})
    with pytest.raises(ValidationError, match=r"selection: random does not apply to embedded:gsm"):
        DataSource(source="embedded:gsm", num_examples=8, selection="random")
    with pytest.raises(ValidationError, match=r"selection: random needs num_examples"):
        DataSource(source="x.jsonl", selection="random")
    with pytest.raises(ValidationError, match=r"user_tag, assistant_tag and system_tag must differ"):
        DataSource(source="x.json", format="sharegpt", tags={"user_tag": "gpt"})
    with pytest.raises(ValidationError, match=r"role_tag and content_tag must differ"):
        DataSource(source="x.json", format="sharegpt", tags={"role_tag": "value"})
    with pytest.raises(ValidationError, match=r"extra"):
        DataSource(source="x.json", format="sharegpt", tags={"observation_tag": "obs"})
    ok = DataSource(source="open-r1/OpenR1-Math-220k", format="messages", num_examples=3000, selection="random")
    assert ok.seed == 0 and ok.tags is None
