"""`data.chat_template_kwargs` reach every place a chat template is applied: the SFT examples, the RL prompts,
the evaluation prompts (and `eksft generate` through vLLM's chat path). The model is the tiny Qwen2 with a
Qwen3-style template: with `enable_thinking: false` the generation prompt ends with an empty think block.

The paper's setting (R1 traces trained after the plain generation prompt, as LlamaFactory's `qwen3_nothink`
template renders them) is the one where the generation prompt is a prefix of the SFT rendering and the trace is
trained; a trace after a prompt that already closes the think block is refused, naming the row.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eksft.config import RecipeError, load_recipe
from eksft.data import IGNORE_INDEX, build_sft_dataset
from eksft.data.config import RESERVED_TEMPLATE_KEYS
from eksft.layout import RLStageDir
from eksft.stages import eval_stage, rl_stage

# Qwen3's behaviour, written small: an assistant turn's <think> block is re-rendered as "<think>\n...\n</think>\n\n",
# the last assistant turn without one gets an empty block, and `enable_thinking: false` closes an empty think
# block in the generation prompt.
QWEN3_STYLE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.last or reasoning %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
PROBLEM = "What is 2 + 2?"
TRACE = "<think>\nTwo and two make four.\n</think>\n\nThe answer is $\\boxed{4}$."
ANSWER_ONLY = "The answer is $\\boxed{4}$."
USER_TURN = f"<|im_start|>user\n{PROBLEM}\nPut your final answer within \\boxed{{}}.<|im_end|>\n"
PROMPT = USER_TURN + "<|im_start|>assistant\n"  # the generation prompt, thinking left on
PROMPT_NO_THINKING = PROMPT + "<think>\n\n</think>\n\n"  # enable_thinking: false


@pytest.fixture(scope="module")
def qwen3_style(tmp_path_factory, tiny_qwen2_dir) -> Path:
    from transformers import AutoTokenizer

    model = tmp_path_factory.mktemp("qwen3_style") / "model"
    shutil.copytree(tiny_qwen2_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = QWEN3_STYLE
    tok.save_pretrained(model)
    return model


def recipe_for(model: Path, tmp_path: Path, solution: str, template_kwargs: str = "{}", extra=()):
    sft, rl = tmp_path / "sft.jsonl", tmp_path / "rl.jsonl"
    sft.write_text(json.dumps({"problem": PROBLEM, "solution": solution}) + "\n")
    rl.write_text(json.dumps({"problem": PROBLEM, "answer": "4"}) + "\n")
    return load_recipe(None, [f"model.name={model}", f"data.sft.source={sft}", "data.sft.format=problem_solution",
                              f"data.rl.source={rl}", f"data.chat_template_kwargs={template_kwargs}",
                              "rollout.engine=hf", "rollout.dtype=float32", "rl.bf16=false", *extra])


def rendered_sft(recipe) -> tuple[str, str]:
    """(the whole example, its trained tokens) as text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(recipe.model.name)
    (ex,), _ = build_sft_dataset(recipe, tok)
    trained = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    return tok.decode(ex["input_ids"]), tok.decode(trained)


def rl_prompt(recipe, tmp_path, monkeypatch) -> str:
    """The prompt the GRPO trainer built (a real trainer on the recipe's stage; its loop is not run)."""
    from transformers import AutoTokenizer

    from rl.grpo.trainer import GRPOTrainer

    seen = {}

    def record(self):
        seen["ids"] = self.prompt_ids[0]
        self.engine.shutdown()
        return tmp_path / "not-trained"

    monkeypatch.setattr(GRPOTrainer, "train", record)
    rl_stage(recipe, recipe.arms[0], recipe.model.name, RLStageDir(tmp_path / "rl"))
    return AutoTokenizer.from_pretrained(recipe.model.name).decode(seen["ids"])


def eval_prompt(recipe, tmp_path, monkeypatch) -> str:
    """The prompt the evaluation's engine received (the real HF engine, spied on)."""
    from transformers import AutoTokenizer

    from rl.rollout.hf_engine import HFEngine

    seen = []
    original = HFEngine.generate
    monkeypatch.setattr(HFEngine, "generate", lambda self, ids, *a, **kw: seen.extend(ids) or original(self, ids, *a, **kw))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"problem": PROBLEM, "answer": "4"}) + "\n")
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={
        "benchmarks": [str(bench)], "n": 1, "max_new_tokens": 2, "num_problems": None})})
    eval_stage(recipe, recipe.model.name, None, None, progress=False)
    return AutoTokenizer.from_pretrained(recipe.model.name).decode(seen[0])


def test_the_paper_setting_trains_the_trace_after_the_plain_generation_prompt(qwen3_style, tmp_path, monkeypatch):
    # enable_thinking left on (LlamaFactory's qwen3_nothink renders the same for these rows): the generation prompt
    # is a prefix of the SFT rendering, the <think> trace and the answer are what is trained.
    recipe = recipe_for(qwen3_style, tmp_path, TRACE)
    whole, trained = rendered_sft(recipe)
    assert whole == PROMPT + TRACE + "<|im_end|>\n"  # the newline after the turn is not trained
    assert trained == TRACE + "<|im_end|>" and whole.removesuffix(trained + "\n") == PROMPT
    assert rl_prompt(recipe, tmp_path, monkeypatch) == PROMPT
    assert eval_prompt(recipe, tmp_path, monkeypatch) == PROMPT


def test_enable_thinking_false_reaches_sft_rl_and_evaluation(qwen3_style, tmp_path, monkeypatch):
    recipe = recipe_for(qwen3_style, tmp_path, ANSWER_ONLY, "{enable_thinking: false}")
    whole, trained = rendered_sft(recipe)
    # The empty think block belongs to the prompt: it is not trained, and RL and evaluation prompt with it.
    assert whole == PROMPT_NO_THINKING + ANSWER_ONLY + "<|im_end|>\n"
    assert trained == ANSWER_ONLY + "<|im_end|>"
    assert rl_prompt(recipe, tmp_path, monkeypatch) == PROMPT_NO_THINKING
    assert eval_prompt(recipe, tmp_path, monkeypatch) == PROMPT_NO_THINKING
    # Without the variable the same answer trains the empty block, and the prompts do not end with it.
    whole, trained = rendered_sft(recipe_for(qwen3_style, tmp_path, ANSWER_ONLY))
    assert trained == "<think>\n\n</think>\n\n" + ANSWER_ONLY + "<|im_end|>" and whole.startswith(PROMPT)


def test_a_trace_after_a_prompt_that_closes_the_think_block_is_refused(qwen3_style, tmp_path):
    recipe = recipe_for(qwen3_style, tmp_path, TRACE, "{enable_thinking: false}")
    with pytest.raises(ValueError) as err:
        rendered_sft(recipe)
    message = str(err.value)
    assert f"{tmp_path / 'sft.jsonl'}: row 1:" in message and "{'enable_thinking': False}" in message
    assert "data.chat_template_kwargs" in message


def test_template_kwargs_enter_every_stage_key(tmp_path):
    from eksft.pipeline import plan

    keys = [{s.name: s.key for s in plan(load_recipe(None, [f"data.chat_template_kwargs={kw}"]), tmp_path)}
            for kw in ("{}", "{enable_thinking: false}")]
    assert keys[0].keys() == keys[1].keys() and all(keys[0][name] != keys[1][name] for name in keys[0])


def test_reserved_names_are_refused_and_the_list_is_complete():
    import inspect

    from transformers import PreTrainedTokenizerBase

    with pytest.raises(RecipeError, match=r"data.chat_template_kwargs: add_generation_prompt: set by the "
                                          r"stages themselves"):
        load_recipe(None, ["data.chat_template_kwargs={add_generation_prompt: true}"])
    own = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"self", "kwargs"}
    assert own <= RESERVED_TEMPLATE_KEYS


@pytest.mark.slow
def test_eksft_generate_passes_them_to_vllms_chat(qwen3_style):
    cmd = [sys.executable, "-m", "eksft.cli", "generate", "--model", str(qwen3_style), "--engine", "vllm", "--dtype",
           "float32", "--max-tokens", "2", "--chat-template-kwargs", "{enable_thinking: false}", PROBLEM]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--- prompt (rendered by vLLM) ---\n{PROMPT_NO_THINKING}" in proc.stdout
