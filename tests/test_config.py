from pathlib import Path

import pytest

from eksft.config import Recipe, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_quickstart_validate():
    assert isinstance(load_recipe(None), Recipe)
    r = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert r.model.name == "embedded:smollm2-135m-instruct"
    assert [(a.name, a.objective.name) for a in r.arms] == [("sft", "sft"), ("eksft", "eksft")]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    load_recipe(path)


def test_unknown_key_names_path_and_allowed_keys(tmp_path):
    p = write(tmp_path, "data:\n  sft:\n    source: x.jsonl\n    fromat: messages\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "data.sft.fromat: unknown key" in msg
    assert "allowed: fields, format, num_examples, revision, seed, selection, source, split, tags" in msg
    assert str(p) in msg


def test_data_source_tags_and_selection_in_a_recipe(tmp_path):
    # The README's example for the EKSFT authors' LlamaFactory file.
    r = load_recipe(write(tmp_path, "data: {sft: {source: data/sup_3k_data.json, format: sharegpt, tags: {role_tag: role, "
                                    "content_tag: value, user_tag: user, assistant_tag: assistant, system_tag: system}}}\n"))
    assert (r.data.sft.tags.role_tag, r.data.sft.tags.user_tag, r.data.sft.selection) == ("role", "user", "first")
    p = write(tmp_path, "data:\n  sft:\n    source: x.jsonl\n    format: messages\n    tags: {role_tag: role}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: data\.sft: tags: only for format: sharegpt \(this source has format: messages\)"):
        load_recipe(p)
    with pytest.raises(RecipeError, match=r"data\.rl: selection: random does not apply to embedded:arithmetic"):
        load_recipe(None, ["data.rl.selection=random"])
    with pytest.raises(RecipeError, match=r"data\.sft\.selection: Input should be 'first' or 'random'"):
        load_recipe(None, ["data.sft.selection=shuffle"])


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(RecipeError, match=r"modle: unknown key \(allowed: arms, data, eval, model, name, output_dir, report, report_to, resources, rl, rollout, seed, seeds, sft\)"):
        load_recipe(write(tmp_path, "modle:\n  name: x\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.max_length: Input should be a valid integer.*'lots'"):
        load_recipe(write(tmp_path, "data:\n  max_length: lots\n"))


def test_bad_enum_names_key_and_choices(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "model:\n  dtype: float8\n"))
    assert "model.dtype" in str(e.value) and "'bfloat16'" in str(e.value) and "'float8'" in str(e.value)


def arm_objective(objective: str) -> list[str]:
    return [f"arms=[{{name: a, objective: {objective}}}]"]


def objective_error(objective: str) -> str:
    """The error of a recipe whose one arm has this objective."""
    with pytest.raises(RecipeError) as e:
        load_recipe(None, arm_objective(objective))
    return str(e.value)


def test_objective_errors_name_the_key():
    assert objective_error("{name: eksft, ratio: 1.5}").startswith(
        "<defaults>: arms.0.objective.ratio: ratio must be within [0, 1]")
    assert "arms.0.objective.combine: Input should be 'union' or 'intersection'" in objective_error(
        "{name: eksft, combine: xor}")
    assert "arms.0.objective.chunk_size: Input should be greater than 0" in objective_error("{name: dft, chunk_size: 0}")


def test_a_key_of_another_objective_is_refused_with_the_allowed_keys():
    """`ratio` belongs to EKSFT: on an `sft` objective it is an error, no longer ignored."""
    assert objective_error("{name: sft, ratio: 0.3}") == (
        "<defaults>: arms.0.objective.ratio: unknown key (allowed: aggregation, chunk_size, name)")
    allowed = "aggregation, chunk_size, combine, lambda_entropy, lambda_kl, largest_entropy, largest_kl, name, ratio, scope"
    assert objective_error("{name: eksft, ratioo: 0.3}") == (
        f"<defaults>: arms.0.objective.ratioo: unknown key (allowed: {allowed})")


def test_an_unknown_or_missing_objective_name_lists_the_registered_ones():
    assert objective_error("{name: eksfd}") == (
        "<defaults>: arms.0.objective.name: unknown objective 'eksfd'; allowed: dft, eksft, sft")
    assert objective_error("{ratio: 0.3}") == "<defaults>: arms.0.objective.name: missing; allowed: dft, eksft, sft"


def test_each_arm_validates_its_own_objective_settings():
    r = load_recipe(None, ["arms=[{name: a, objective: {name: eksft, ratio: 0.3}}, {name: b, objective: {name: dft}}, "
                           "{name: c, objective: null}]"])
    a, b, c = (arm.objective for arm in r.arms)
    assert type(a).__name__ == "EKSFTSettings" and a.ratio == 0.3
    assert type(b).__name__ == "DFTSettings" and not hasattr(b, "ratio") and c is None


def test_the_objective_lives_in_the_arms_only():
    with pytest.raises(RecipeError, match=r"<defaults>: sft\.objective: unknown key \(allowed: adam_betas, .*\); "
                                          r"objectives belong to arms: arms\[\]\.objective"):
        load_recipe(None, ["sft.objective.ratio=0.3"])


def test_set_overrides_are_typed_and_validated():
    r = load_recipe(None, ["data.max_length=512", "model.trust_remote_code=true", "arms.eksft.objective.ratio=0.1"])
    assert r.data.max_length == 512 and r.model.trust_remote_code is True and r.arm("eksft").objective.ratio == 0.1
    with pytest.raises(RecipeError, match=r"data\.maxlen: unknown key"):
        load_recipe(None, ["data.maxlen=3"])
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(None, ["data.max_length"])
    # A value that is not YAML names the key and the value (it used to escape as a yaml traceback).
    with pytest.raises(RecipeError, match=r"--set model\.name: the value '\[a' is not valid YAML"):
        load_recipe(None, ["model.name=[a"])
    assert load_recipe(None, ['model.name="[a"']).model.name == "[a"  # quoted, it is a string


def test_trust_remote_code_is_off_by_default():
    assert load_recipe(None).model.trust_remote_code is False


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(write(tmp_path, "- 1\n- 2\n"))


def test_set_selects_list_items_by_name_and_materialises_the_default_arms():
    default = load_recipe(None)
    r = load_recipe(None, ["arms.eksft.objective.ratio=0.3", "arms.sft.rl.learning_rate=2e-6"])
    assert [a.name for a in r.arms] == [a.name for a in default.arms]  # the defaults, edited, not replaced
    assert r.arm("eksft").objective.ratio == 0.3 and r.arm("eksft").objective == \
        default.arm("eksft").objective.model_copy(update={"ratio": 0.3})
    assert r.arm_rl(r.arm("sft")).learning_rate == 2e-6 and r.arm_rl(r.arm("eksft")).learning_rate == r.rl.learning_rate
    # Names with dots (the ablation recipe's) are found whole.
    dotted = load_recipe(ROOT / "recipes" / "ablation_ratio.yaml", ["arms.eksft_r0.1_union.objective.ratio=0.15"])
    assert dotted.arm("eksft_r0.1_union").objective.ratio == 0.15
    assert dotted.arm("eksft_r0.2_union").objective.ratio == 0.2
    with pytest.raises(RecipeError, match=r"--set arms\.eksf\.objective\.ratio: arms has no item named 'eksf' "
                                          r"\(arms: sft, eksft\)"):
        load_recipe(None, ["arms.eksf.objective.ratio=0.3"])
    with pytest.raises(RecipeError, match=r"eval\.benchmarks is a list without names"):
        load_recipe(None, ["eval.benchmarks=[gsm8k]", "eval.benchmarks.gsm8k=1"])


def test_arm_lookup_and_rl_overrides_merged_at_every_depth():
    r = load_recipe(None, ["rl.lora.enabled=true", "rl.lora.r=8", "arms.eksft.rl.lora.alpha=4",
                           "arms=[{name: a, objective: {name: eksft}, rl: {lora: {r: 4}}}, {name: base, objective: null}]"])
    assert r.arm_rl(r.arm("a")).lora.model_dump() == {**r.rl.lora.model_dump(), "r": 4}  # enabled stays true
    assert r.arm_rl(r.arm("base")) == r.rl
    with pytest.raises(RecipeError, match=r"--arm x: no such arm \(arms: a, base\)"):
        r.arm("x")


def test_every_arm_must_save_the_checkpoints_its_evaluations_read():
    load_recipe(None, ["eval.every_rl_steps=4", "rl.save_every=2"])
    with pytest.raises(RecipeError, match=r"eval.every_rl_steps \(4\) must be a multiple of rl.save_every of arm "
                                          r"eksft \(3\)"):
        load_recipe(None, ["eval.every_rl_steps=4", "rl.save_every=2", "arms.eksft.rl.save_every=3"])


def test_a_stated_global_batch_must_be_the_product():
    recipe = load_recipe(None, ["sft.workers=2", "sft.batch_size=1", "sft.grad_accum=4", "sft.global_batch=8"])
    assert recipe.sft.sequences_per_step() == 8
    assert recipe.sft.describe_global_batch() == ("global batch = 2 workers x batch_size 1 x grad_accum 4 = 8 "
                                                  "sequences per optimizer step")
    with pytest.raises(RecipeError, match=r"sft: global_batch is 64, but global batch = 1 worker x batch_size 1 x "
                                          r"grad_accum 8 = 8 sequences per optimizer step"):
        load_recipe(None, ["sft.grad_accum=8", "sft.global_batch=64"])


def test_the_rehearsal_has_the_paper_recipes_shape():
    """What the one-GPU rehearsal must share with the paper recipe to rehearse it; only sizes may differ."""
    paper, rehearsal = (load_recipe(ROOT / "recipes" / f"{name}.yaml") for name in ("paper_qwen3_8b", "paper_rehearsal_1gpu"))
    sizes = {"num_examples", "max_length", "epochs", "workers", "grad_accum", "global_batch", "save_steps",
             "save_total_limit", "steps", "prompts_per_step", "max_new_tokens", "mini_batch_size", "save_every",
             "max_model_len", "kv_cache_gib", "num_problems", "n", "every_rl_steps", "num_cpus", "num_gpus", "name"}

    def shape(section) -> dict:
        dump = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
        if isinstance(dump, dict):
            return {k: shape(v) for k, v in dump.items() if k not in sizes}
        return [shape(v) for v in dump] if isinstance(dump, list) else dump

    for section in ("data", "sft", "rl", "rollout", "eval", "arms", "report_to", "seed"):
        assert shape(getattr(rehearsal, section)) == shape(getattr(paper, section)), section
    assert [a.name for a in rehearsal.arms] == [a.name for a in paper.arms] == ["base", "sft", "eksft"]
    # The authors' global batch on 8 GPUs: 8 workers (a GPU each) x 1 x 8; the stage's own process needs no GPU.
    assert paper.sft.sequences_per_step() == 64 and paper.sft.workers == 8 and paper.resources.sft.num_gpus == 0
    # The rl section's updates per step: prompts x group / mini-batch, alike in both.
    assert {r.rl.prompts_per_step * r.rl.group_size // r.rl.mini_batch_size for r in (paper, rehearsal)} == {4}
