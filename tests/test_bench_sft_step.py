"""benchmarks/sft_step.py: the naive baseline computes the eksft loss, steps run, the JSON has its keys.

No timing assertions: the numbers come from the benchmark itself, on real shapes.
"""

import json
import math

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to the 2-thread slowdown under background load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("sft_step")


@pytest.fixture(scope="module")
def args(bench, tiny_qwen2_dir):
    # float32 on every CPU (auto would be bf16 where native): the equivalence check's tolerance is float32's
    return bench.parse_args(["--model", "tiny:qwen2", "--batch", "3", "--seq", "48", "--steps", "2", "--warmup", "1",
                             "--device", "cpu", "--no-bf16"])


def _grads(setup):
    return {n: p.grad.detach().clone() for n, p in setup.policy.named_parameters() if p.grad is not None}


def test_naive_baseline_matches_eksft_loss_and_gradients(bench, args):
    s = bench.build_setup(args, need_ref=True)
    check = bench.compare_losses(s)
    assert check["status"] == "ok", check
    assert check["entropy_selection_mismatches"] == 0 and check["kl_selection_mismatches"] == 0
    assert check["kl_mean"] > 0  # the reference differs from the policy, so KL does not select by ties
    assert 0 < check["selected_per_set"] < check["valid_tokens"]

    # Same gradient too: the baseline differs in cost only.
    eksft = bench.eksft_loss(s)
    eksft.backward()
    g_eksft = _grads(s)
    s.policy.zero_grad(set_to_none=True)
    naive = bench.naive_loss(s)
    naive.backward()
    g_naive = _grads(s)
    assert math.isclose(float(eksft.detach()), float(naive.detach()), rel_tol=1e-5, abs_tol=1e-6)
    assert g_eksft.keys() == g_naive.keys() and g_eksft
    for name in g_eksft:
        torch.testing.assert_close(g_naive[name], g_eksft[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_forward_padded_and_packed_match_eksft(bench, args):
    """The packed variant computes the same loss and gradients as the padded one (and as plain `eksft`)."""
    s = bench.build_setup(args, need_ref=True)
    assert len(set(s.attention_mask.sum(1).tolist())) > 1  # rows of different lengths: padding to remove
    check = bench.compare_losses(s)
    assert check["status"] == "ok", check
    grads = {}
    for packed in (False, True):
        s.policy.zero_grad(set_to_none=True)
        bench.trainer_eksft_loss(s, packed=packed).backward()
        grads[packed] = _grads(s)
    assert grads[False].keys() == grads[True].keys() and grads[False]
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6, msg=name)


def test_naive_matches_eksft_under_bf16_autocast(bench, tiny_qwen2_dir):
    args = bench.parse_args(["--model", "tiny:qwen2", "--batch", "2", "--seq", "40", "--bf16", "--device", "cpu"])
    s = bench.build_setup(args, need_ref=True, need_optimizer=False)
    assert s.autocast
    assert bench.compare_losses(s)["status"] == "ok"


def test_steps_run_and_results_have_the_expected_keys(bench, args, tmp_path):
    rows = []
    for variant in bench.VARIANTS:
        row = bench.run_variant(args, variant)
        assert row["status"] == "ok" and len(row["step_times"]) == args.steps
        assert all(math.isfinite(x) for x in row["losses"]) and len(row["losses"]) == args.steps + args.warmup
        rows.append(row)
    inter = bench.run_interleaved(args, list(bench.VARIANTS))
    assert all(len(inter["timings"][v]["step_times"]) == args.steps for v in bench.VARIANTS)

    facts = bench.run_check(args)
    result = bench.assemble(args, facts, rows)
    json_path, md_path = bench.write_results(tmp_path / "sft_step_test.json", result)
    data = json.loads(json_path.read_text())
    assert {"config", "device", "torch_version", "rows", "ratios", "check", "model", "batch"} <= data.keys()
    assert data["check"]["status"] == "ok"
    assert [r["variant"] for r in data["rows"]] == list(bench.VARIANTS)
    for r in data["rows"]:
        assert {"variant", "step_time_s_median", "step_times", "peak_mem_mb", "mem_method"} <= r.keys()
    ratios = data["ratios"]
    for key in ("eksft_over_sft_time", "naive_over_eksft_time", "naive_over_eksft_mem", "eksft_over_sft_mem"):
        assert key in ratios
    assert ratios["eksft_over_sft_time"] > 0
    assert data["config"]["objective"]["scope"] == "batch"
    assert data["config"]["objective"]["aggregation"] == "token-mean"
    table = md_path.read_text()
    assert "| eksft |" in table and "naive_over_eksft_time" in table


def test_oom_is_recorded_not_raised(bench, args, monkeypatch):
    def boom(s):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    monkeypatch.setitem(bench.LOSSES, "naive", boom)
    row = bench.run_variant(args, "naive")
    assert row["status"] == "oom" and row["step_time_s_median"] is None and "out of memory" in row["error"]
    ratios = bench.compute_ratios([{"variant": "eksft", "status": "ok", "step_time_s_median": 1.0, "peak_mem_mb": 5.0},
                                   row])
    assert ratios["naive_over_eksft_time"] is None
