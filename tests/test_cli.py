import re
import subprocess
import sys

import pytest

from eksft.cli import build_parser, main


def _subcommand_paths(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommand_paths(sub, (*prefix, name))


def test_every_subcommand_has_help(capsys):
    paths = list(_subcommand_paths(build_parser()))
    assert ("models", "prepare") in paths and ("data", "preview") in paths
    for path in [(), *paths]:
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: eksft" in out and len(out) > 100


def test_the_command_line_process_exits_with_mains_status(tmp_path):
    """``python -m eksft.cli`` (what the ``eksft`` script runs) hands main's status to the shell."""
    bad = tmp_path / "r.yaml"
    bad.write_text("data:\n  max_lenght: 3\n")
    done = subprocess.run([sys.executable, "-m", "eksft.cli", "data", "preview", "--recipe", str(bad)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "data.max_lenght: unknown key" in done.stderr


def test_data_preview_marks_trained_tokens(capsys):
    code = main(["data", "preview", "--set", "model.name=tiny:qwen2", "--set", "data.sft.num_examples=5", "-n", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "5 examples" in out and "truncated 0" in out
    heads = re.findall(r"example \d+: (\d+) tokens, (\d+) trained", out)
    assert len(heads) == 2 and all(0 < int(trained) < int(total) for total, trained in heads)  # -n 2; prompt untrained
    assert out.count("\\boxed{") == 5  # per example: the instruction's empty box and the answer's; the RL prompt's


def test_data_preview_reports_truncation(capsys):
    code = main(["data", "preview", "--set", "model.name=tiny:qwen2", "--set", "data.sft.num_examples=4",
                 "--set", "data.max_length=70", "-n", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "truncated at max_length=70" in out and "embedded:arithmetic: row 1" in out


def test_recipe_error_exit_code(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  max_lenght: 3\n")
    assert main(["data", "preview", "--recipe", str(p)]) == 2
    assert "data.max_lenght: unknown key" in capsys.readouterr().err


def test_data_error_exit_code(tmp_path, capsys):
    f = tmp_path / "t.jsonl"
    f.write_text('{"problem": "x"}\n')
    assert main(["data", "preview", "--set", "model.name=tiny:qwen2", "--set", f"data.sft.source={f}"]) == 2
    assert "t.jsonl: row 1: cannot tell the row format" in capsys.readouterr().err


AUTHORS_TAGS = "data.sft.tags={role_tag: role, content_tag: value, user_tag: user, assistant_tag: assistant, system_tag: system}"
LOCAL = {  # the paper recipes' data, swapped for local fixtures of the same shapes (and a model that needs no hub)
    "paper_rehearsal_1gpu": ["data.sft.source=tests/fixtures/openr1_math_rows.jsonl"],
    "paper_qwen3_8b": ["data.sft.source=tests/fixtures/sharegpt_role_value.json", "data.sft.format=sharegpt",
                       AUTHORS_TAGS, "data.sft.selection=first", "data.sft.num_examples=null"],
}


@pytest.mark.parametrize("recipe", sorted(LOCAL))
def test_data_preview_of_the_paper_recipes_on_local_fixtures(recipe, capsys):
    overrides = ["model.name=tiny:qwen2", "data.rl.source=embedded:arithmetic", "data.rl.format=auto", *LOCAL[recipe]]
    assert main(["data", "preview", "--recipe", f"recipes/{recipe}.yaml", "-n", "1",
                 *(a for o in overrides for a in ("--set", o))]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    rows = 6 if recipe == "paper_rehearsal_1gpu" else 4
    assert f"{rows} examples" in out and "dropped 0" in out
    assert "chat template variables (data.chat_template_kwargs, also in RL and evaluation prompts): " \
           "{'enable_thinking': True}" in out
    assert "<think>" in out and "RL / evaluation prompt: first row of embedded:arithmetic" in out
