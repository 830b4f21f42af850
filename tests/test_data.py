import json

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
    with pytest.raises(DataError, match=r"na\.jsonl: row 1: no assistant message"):
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
