"""The shared routing helpers (``peft_ext/tuners/_shared/routing.py``) against independent oracles, and the per-call
input / auxiliary-loss plumbing of ``ExtModel`` through ``PeftModel`` for every routed or aux-loss method."""

from __future__ import annotations

import pytest
import torch

from peft_ext.tuners._shared.routing import check_route_input, expert_load, load_balance_loss, topk_route


def test_topk_route_selects_renormalises_and_matches_dense_softmax_at_k_equal_e():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 6)
    weights, mask, probs = topk_route(logits, k=2)
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    assert torch.equal(mask.sum(-1), torch.full((5, 7), 2.0))
    # oracle: for each token, the two largest probabilities divided by their sum
    top, idx = probs.topk(2, dim=-1)
    expected = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5, 7))
    dense, full_mask, _ = topk_route(logits, k=6)
    torch.testing.assert_close(dense, torch.softmax(logits, -1))
    assert torch.equal(full_mask, torch.ones_like(full_mask))
    raw, _, _ = topk_route(logits, k=2, renormalize=False)
    torch.testing.assert_close(raw, torch.zeros_like(probs).scatter(-1, idx, top))


def test_load_balance_loss_matches_the_switch_formula_and_is_minimal_when_uniform():
    torch.manual_seed(1)
    logits = torch.randn(40, 4)
    _, mask, probs = topk_route(logits, k=2)
    # oracle written out with loops: E * sum_e (share of slots routed to e) * (mean router prob of e)
    n, e = probs.shape
    oracle = 0.0
    for j in range(e):
        f = sum(float(mask[i, j]) for i in range(n)) / n
        p = sum(float(probs[i, j]) for i in range(n)) / n
        oracle += f * p
    oracle *= e
    assert load_balance_loss(probs, mask).item() == pytest.approx(oracle, rel=1e-6)
    uniform = torch.full((8, 4), 0.25)
    # uniform probabilities and every expert taking an equal share of k = 2 slots: the minimum, k
    assert load_balance_loss(uniform, torch.ones(8, 4) * 0.5).item() == pytest.approx(2.0)
    # padding tokens are left out
    keep = torch.tensor([True] * 20 + [False] * 20)
    assert load_balance_loss(probs, mask, keep).item() == pytest.approx(
        load_balance_loss(probs[:20], mask[:20]).item(), rel=1e-6)
    torch.testing.assert_close(expert_load(mask), mask.mean(0))


def test_check_route_input_shapes_dtypes_and_messages():
    x = torch.randn(2, 5, 8)
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert check_route_input("route_ids", ids, x, kind="int") is not None
    assert check_route_input("route_ids", None, x, kind="int") is None
    with pytest.raises(ValueError, match=r"route_ids must have shape \(2, 5\)"):
        check_route_input("route_ids", torch.zeros(2, 4, dtype=torch.long), x, kind="int")
    with pytest.raises(ValueError, match="route_ids must be an integer tensor"):
        check_route_input("route_ids", torch.zeros(2, 5), x, kind="int")
    with pytest.raises(ValueError, match="modality must only hold 0 and 1"):
        check_route_input("modality", torch.full((2, 5), 2), x, kind="bool")
    assert check_route_input("modality", torch.ones(2, 5, dtype=torch.long), x, kind="bool").dtype == torch.bool
    per_sample = check_route_input("gate", torch.tensor([0.0, 1.0]), x, kind="float", per_sample_ok=True)
    assert per_sample.shape == (2, 1)
    assert check_route_input("gate", 0.5, x, kind="float", per_sample_ok=True).item() == 0.5
    with pytest.raises(ValueError, match="gate must be a torch.Tensor"):
        check_route_input("gate", 0.5, x, kind="float")
    with pytest.raises(ValueError, match="one per sample"):
        check_route_input("gate", torch.ones(3), x, kind="float", per_sample_ok=True)


def test_aux_loss_enters_a_gradient_accumulation_step_once():
    """With ``num_items_in_batch`` (Trainer's gradient accumulation / multi-process normalisation) the tuner weights
    its auxiliary loss by the micro-batch's token share, so two half batches sum to the full batch's loss. O3's
    orthogonality loss depends on the weights only, which makes the identity exact."""
    from peft import get_peft_model

    from conftest import randomize_adapter, tiny_llama
    from peft_ext import O3LoraConfig
    from peft_ext.tuners.o3_lora import start_new_request

    model = get_peft_model(tiny_llama(), O3LoraConfig(r=4, lora_alpha=8, orth_weight=0.5, target_modules=["q_proj"]))
    randomize_adapter(model)
    start_new_request(model)  # the current A becomes a snapshot: the orthogonality loss is large
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (4, 12))
    full = model(input_ids=ids, labels=ids).loss
    aux = model.base_model.aux_loss()
    assert aux is not None and aux.item() > 0.1
    total = torch.tensor(4 * 11)  # label tokens after the causal shift
    halves = sum(model(input_ids=ids[i : i + 2], labels=ids[i : i + 2], num_items_in_batch=total).loss for i in (0, 2))
    torch.testing.assert_close(halves, full, rtol=1e-5, atol=1e-6)
    # unweighted, the auxiliary term would have counted twice
    assert abs((halves + aux) - full).item() > 0.5 * aux.item()
