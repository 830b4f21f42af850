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
    assert r.sft.objective.name == "eksft"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    load_recipe(path)


def test_unknown_key_names_path_and_allowed_keys(tmp_path):
    p = write(tmp_path, "data:\n  sft:\n    source: x.jsonl\n    fromat: messages\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "data.sft.fromat: unknown key" in msg
    assert "allowed: fields, format, num_examples, seed, source, split" in msg
    assert str(p) in msg


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(RecipeError, match=r"modle: unknown key \(allowed: arms, data, eval, model, name, output_dir, report_to, resources, rl, rollout, seed, sft\)"):
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


def test_set_overrides_are_typed_and_validated():
    r = load_recipe(None, ["data.max_length=512", "model.trust_remote_code=true",
                           *arm_objective("{name: eksft, ratio: 0.1}")])
    assert r.data.max_length == 512 and r.model.trust_remote_code is True and r.arms[0].objective.ratio == 0.1
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


def test_for_arm_sets_the_arms_objective():
    arms = ("arms=[{name: a, objective: {name: eksft, ratio: 0.1, combine: intersection}}, "
            "{name: base, objective: null}]")
    r = load_recipe(None, ["sft.objective={name: eksft, ratio: 0.3}", arms])
    a = r.for_arm("a")
    assert a.sft.objective.ratio == 0.1 and a.sft.objective.combine == "intersection"
    assert r.sft.objective.ratio == 0.3 and a.sft.learning_rate == r.sft.learning_rate  # the recipe is unchanged
    with pytest.raises(RecipeError, match=r"--arm base: this arm has no cold-start objective"):
        r.for_arm("base")
    with pytest.raises(RecipeError, match=r"--arm x: no such arm \(arms: a, base\)"):
        r.for_arm("x")
