"""The share of weights an update of size lr cannot move, against hand values and the float spacing formula."""

import math

import pytest
import torch

from eksft.sft.precision import low_precision_warning, vanishing_update_share


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
