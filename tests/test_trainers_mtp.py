"""Multi-token prediction with gated LoRA (https://arxiv.org/abs/2507.11851): the gate leaves the base untouched, the
interleaved layout reproduces a plain forward at regular tokens, speculative decoding reproduces greedy generate(),
only the adapter, the sampler and the mask row train, and the recipe entry writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from peft import get_peft_model

from peft_ext import GatedLoraConfig
from peft_ext.trainers.mtp import (
    MTPConfig,
    MTPModel,
    collate,
    mtp_generate,
    mtp_layout,
    train_mtp,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
# fp32 on CPU: the interleaved forward has longer rows in every attention softmax and matmul (masked keys add exact
# zeros), so only summation order differs from the plain forward; observed differences are ~1e-7 on logits of
# magnitude ~1, 1e-5 leaves two orders of margin while a leak of one mask into a regular token moves them by ~1e-2.
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread


def mtp_model(seed: int = 0, random_adapter: bool = True, k: int = 3) -> MTPModel:
    base = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    model = get_peft_model(base, GatedLoraConfig(r=4, target_modules=TARGETS, init_weights=not random_adapter))
    return MTPModel(model, num_masks=k).eval()


def test_gate_off_is_the_base_bit_for_bit():
    mtp = mtp_model()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with mtp.model.disable_adapter():
            base = mtp.model(input_ids=ids).logits
        off = mtp.model(input_ids=ids, gate=torch.zeros_like(ids, dtype=torch.bool)).logits
        on = mtp.model(input_ids=ids, gate=torch.ones_like(ids, dtype=torch.bool)).logits
    assert torch.equal(off, base)
    assert (on - base).abs().max() > 1e-3  # the random adapter does change gated tokens: the equality is not vacuous


def test_interleaved_regular_tokens_equal_a_plain_forward():
    mtp = mtp_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 10), generator=g)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :3] = False  # left padding on the second row
    anchors = torch.arange(10)  # k masks after every regular token (the training layout)
    with torch.no_grad():
        layout = mtp_layout(ids, valid, anchors, mtp.num_masks)
        hidden = mtp.forward_layout(layout)
        interleaved = mtp.lm_head(hidden[:, :10])
        for row in range(2):
            plain = mtp.model(input_ids=ids[row : row + 1, valid[row]]).logits[0]
            torch.testing.assert_close(interleaved[row, valid[row]], plain, atol=ATOL, rtol=0)
        # the masks themselves run the adapter: their states differ from the same layout with the gate forced off
        z = hidden[:, 10:]
        with mtp.model.disable_adapter():
            z_off = mtp.forward_layout(layout)[:, 10:]
    assert (z - z_off).abs().max() > 1e-3
    # mask d after regular i sits at position pos(i) + d + 1 and sees its anchor's prefix plus earlier block masks
    pos = layout["position_ids"][0]
    assert pos[10 : 10 + 3].tolist() == [1, 2, 3] and pos[10 + 3 * 4 : 10 + 3 * 5].tolist() == [5, 6, 7]
    mask = layout["attention_mask"][0, 0]
    q = 10 + 3 * 4 + 1  # mask 1 after regular 4
    assert mask[q, :10].tolist() == [True] * 5 + [False] * 5
    assert mask[q, 10:].nonzero().flatten().tolist() == [12, 13]  # block 4's masks 0 and 1
    assert not mask[:10, 10:].any()  # no regular token ever sees a mask


@pytest.mark.parametrize("verification", ["linear", "quadratic"])
def test_speculative_greedy_equals_generate(verification, monkeypatch):
    mtp = mtp_model(seed=2)
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = mtp.model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert reference.shape[1] == 7 + 24
    # 1) the model's own drafts (random adapter and sampler: almost all rejected)
    out, stats = mtp_generate(mtp, prompt, 24, verification=verification)
    assert torch.equal(out, reference)
    assert stats["new_tokens"] == 24
    # 2) drafts from an oracle that knows the reference but puts one wrong token into every third block: full,
    #    partial and no acceptance all happen, so every way of cutting the KV cache back is exercised
    seq = reference[0].tolist()
    real_forward = mtp.forward_layout
    state = {"calls": 0}

    def forward_layout(layout, past_key_values=None):
        state["cache"] = past_key_values
        return real_forward(layout, past_key_values)

    def oracle(z, first_prev):
        # at drafting time the cache holds every token before first_prev, so first_prev is token number len(cache)
        pos = state["cache"].get_seq_length()
        assert seq[pos] == first_prev
        tokens = [seq[pos + 1 + d] if pos + 1 + d < len(seq) else 0 for d in range(z.shape[0])]
        state["calls"] += 1
        if state["calls"] % 3 == 0:
            j = state["calls"] % len(tokens)
            tokens[j] = (tokens[j] + 1) % 128
        return tokens

    monkeypatch.setattr(mtp, "forward_layout", forward_layout)
    monkeypatch.setattr(mtp, "draft", oracle)
    out, stats = mtp_generate(mtp, prompt, 24, verification=verification)
    assert torch.equal(out, reference)
    assert 0 < stats["accepted_drafts"] < stats["drafted"]
    assert stats["tokens_per_forward"] > 1.5  # accepted drafts really save forwards


def test_only_adapter_sampler_and_mask_row_train():
    mtp = mtp_model(random_adapter=False)
    base = {n: p.detach().clone() for n, p in mtp.model.named_parameters() if not p.requires_grad}
    emb = mtp.model.get_input_embeddings().weight
    trainable = {n for n, p in mtp.named_parameters() if p.requires_grad}
    assert trainable and all("gated_lora_" in n or n.startswith("head.") for n in trainable)
    assert not emb.requires_grad and not mtp.model.get_output_embeddings().weight.requires_grad
    g = torch.Generator().manual_seed(4)
    data = [
        (torch.randint(0, 128, (5 + i,), generator=g).tolist(), torch.randint(0, 128, (8,), generator=g).tolist())
        for i in range(3)
    ]
    before = {n: p.detach().clone() for n, p in mtp.named_parameters() if p.requires_grad}
    history = train_mtp(mtp, data, MTPConfig(steps=3, batch_size=2, learning_rate=1e-2), pad_id=0)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    for name, p in mtp.model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name  # the base (embedding matrix included) is untouched
    changed = {n for n, p in mtp.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert "head.mask_embedding" in changed
    assert any("gated_lora_up" in n for n in changed) and any(n.startswith("head.sampler") for n in changed)


def test_loss_targets_and_consistency_on_a_hand_check():
    """The loss's pieces against a direct computation on one sequence (one plain layout forward, no KV cache): the CE
    of lm_head at the masks against the token d + 2 after the anchor, and the consistency term against the regular
    state one position before that token."""
    mtp = mtp_model(random_adapter=False, k=2)
    ids, valid, start = collate([([5, 6, 7, 8], [9, 10, 11, 12, 13])], pad_id=0)
    cfg = MTPConfig(sampler_loss_weight=0.0, consistency_loss_weight=0.0)
    with torch.no_grad():
        loss, terms = mtp.loss(ids, valid, start, cfg)
        anchors = torch.arange(start - 1, ids.shape[1] - 2)
        hidden = mtp.forward_layout(mtp_layout(ids, valid, anchors, 2))
        z = hidden[0, ids.shape[1] :].view(len(anchors), 2, -1)
        logp = torch.log_softmax(mtp.lm_head(z), -1)
        nll = [
            -logp[b, d, ids[0, a + d + 2]]
            for b, a in enumerate(anchors.tolist())
            for d in range(2)
            if a + d + 2 < ids.shape[1]
        ]
    # same float32 computation through a KV cache vs one forward: summation-order differences only (1e-5 relative)
    torch.testing.assert_close(loss, torch.stack(nll).mean(), rtol=1e-5, atol=1e-5)
    assert terms["targets"] == len(nll)
    # consistency alone: mean over targets and hidden units of (z_mask - z of the regular position predicting the
    # same token)^2, that position being one before the target
    with torch.no_grad():
        loss_c, _ = mtp.loss(ids, valid, start, MTPConfig(mtp_loss_weight=0.0, sampler_loss_weight=0.0))
    gaps = [
        (z[b, d] - hidden[0, a + d + 1]).pow(2).mean()
        for b, a in enumerate(anchors.tolist())
        for d in range(2)
        if a + d + 2 < ids.shape[1]
    ]
    torch.testing.assert_close(loss_c, torch.stack(gaps).mean(), rtol=1e-5, atol=1e-6)
    # soft targets (MTP-GLoRA): CE against the base distribution at that same regular position
    with torch.no_grad():
        loss_s, _ = mtp.loss(ids, valid, start, MTPConfig(soft_targets=True, sampler_loss_weight=0.0,
                                                          consistency_loss_weight=0.0))
        base_p = torch.softmax(mtp.lm_head(hidden[0, : ids.shape[1]]), -1)
    soft = [-(base_p[a + d + 1] * logp[b, d]).sum() for b, a in enumerate(anchors.tolist()) for d in range(2)
            if a + d + 2 < ids.shape[1]]
    torch.testing.assert_close(loss_s, torch.stack(soft).mean(), rtol=1e-5, atol=1e-5)
    assert loss_c > 0  # the mask row differs from real tokens, so mask states are not the base states


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="verification"):
        MTPConfig(verification="cubic")
    with pytest.raises(ValueError, match="num_masks"):
        MTPConfig(num_masks=0)
    with pytest.raises(ValueError, match="gated_lora"):
        MTPModel(tiny_llama())
    mtp = mtp_model()
    with pytest.raises(ValueError, match=r"\[1, length\]"):
        mtp_generate(mtp, torch.zeros(2, 3, dtype=torch.long), 4)


def test_save_load_and_measure(tmp_path):
    mtp = mtp_model()
    mtp.head.mask_embedding.data.normal_()
    mtp.save_pretrained(tmp_path / "a")
    again = MTPModel.from_pretrained(tiny_llama(0), tmp_path / "a").eval()
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    layout = mtp_layout(prompt, None, torch.tensor([5]), mtp.num_masks)
    with torch.no_grad():
        assert torch.equal(mtp.forward_layout(layout), again.forward_layout(layout))
    assert json.loads((tmp_path / "a" / "mtp_config.json").read_text())["num_masks"] == 3


def test_tiny_recipe_writes_adapter_metrics_and_plot(tmp_path, capsys):
    """recipes/tiny_mtp.yaml through the ``peft-ext`` command (``trainer: mtp``); ``--resume`` with a complete adapter
    trains nothing and decodes the same; a misspelt MTP key is one line, exit 2."""
    from peft_ext import cli

    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny_mtp.yaml")
    out = tmp_path / "run"
    assert cli.main(["train", recipe, "--set", f"output_dir={out}", "--quiet"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (
        out / "adapter" / "mtp_head.safetensors"
    ).is_file()
    assert (out / "results.png").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["decoding"]["identical"] == 1.0 and saved["decoding"]["tokens_per_forward"] >= 1.0
    assert len(saved["history"]) == 2  # trainer.args.steps of the tiny recipe
    assert cli.main(["train", recipe, "--set", f"output_dir={out}", "--quiet", "--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["decoding"]["tokens_per_forward"] == saved["decoding"]["tokens_per_forward"]
    capsys.readouterr()
    assert cli.main(["train", recipe, "--set", f"output_dir={out}", "--set", "trainer.args.num_mask=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trainer.args.num_mask" in err
