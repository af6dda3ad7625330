"""LISA layer sampling (https://arxiv.org/abs/2403.17919) on a tiny random 6-block Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_llama_config
from peft_ext.callbacks.lisa import LisaCallback, find_layers, lisa_parameters

L = 6


def llama6(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config()
    cfg.num_hidden_layers = L
    return LlamaForCausalLM(cfg)


def block_of(name):
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None


def trainable_blocks(model):
    return sorted({block_of(n) for n, p in model.named_parameters() if p.requires_grad} - {None})


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 10), generator=gen)
    return {"input_ids": ids, "labels": ids}


def test_finds_decoder_layers():
    model = llama6()
    path, layers = find_layers(model)
    assert path == "model.layers" and layers is model.model.layers
    peft_model = get_peft_model(llama6(), LoraConfig(r=4, target_modules=["q_proj"]))
    path, layers = find_layers(peft_model)
    assert layers is peft_model.base_model.model.model.layers
    assert peft_model.get_submodule(path) is layers
    assert find_layers(model, "model.layers")[1] is model.model.layers
    with pytest.raises(ValueError):
        find_layers(model, "model.nope")


def test_active_sets_deterministic_and_change_every_k():
    K, gamma = 3, 2
    runs = []
    for _ in range(2):
        model = llama6()
        lisa = LisaCallback(model, n_layers=gamma, interval_steps=K, seed=5)
        per_step = [tuple(lisa.step()) for _ in range(4 * K)]
        runs.append(per_step)
        assert [s for s, _ in lisa.history] == [0, K, 2 * K, 3 * K]
    assert runs[0] == runs[1]
    per_step = runs[0]
    for k in range(4):
        chunk = per_step[k * K : (k + 1) * K]
        assert len(set(chunk)) == 1 and len(chunk[0]) == gamma and len(set(chunk[0])) == gamma
    intervals = [per_step[k * K] for k in range(4)]
    assert len(set(intervals)) > 1  # the sets change (4 draws of C(6,2)=15 sets all equal: impossible here)
    other = LisaCallback(llama6(), n_layers=gamma, interval_steps=K, seed=6)
    assert [tuple(other.sample(k)) for k in range(4)] != intervals


def test_same_sets_as_official_numpy_draws():
    """The official callback calls np.random.choice(L, γ, replace=False) at steps 0, K, 2K after np.random.seed."""
    seed, gamma, K = 42, 2, 20
    np.random.seed(seed)
    official = [sorted(np.random.choice(L, gamma, replace=False).tolist()) for _ in range(3)]
    state = np.random.get_state()
    lisa = LisaCallback(llama6(), n_layers=gamma, interval_steps=K, seed=seed)
    ours = [lisa.step(global_step=s) for s in (0, 20, 40)]
    assert ours == official
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # the global RNG is left alone


def test_resume_depends_only_on_seed_and_step():
    K = 2
    full = LisaCallback(llama6(), n_layers=2, interval_steps=K, seed=1)
    seq = [list(full.step(s)) for s in range(12)]
    resumed = LisaCallback(llama6(), n_layers=2, interval_steps=K, seed=1)
    assert [list(resumed.step(s)) for s in range(7, 12)] == seq[7:]  # starts mid-interval, switches at once
    assert resumed.history[0][0] == 7
    # out of order queries give the same answers
    assert resumed.sample(0) == seq[0] and resumed.sample(5) == seq[10]


def test_exactly_gamma_blocks_plus_embeddings_and_head_train():
    model = llama6()
    lisa = LisaCallback(model, n_layers=2, interval_steps=1, seed=0)
    for step in range(5):
        active = lisa.step(step)
        assert trainable_blocks(model) == active and len(active) == 2
        outside = {n: p.requires_grad for n, p in model.named_parameters() if block_of(n) is None}
        assert outside == {"model.embed_tokens.weight": True, "model.norm.weight": True, "lm_head.weight": True}
        for i in active:  # the whole block trains, norms inside it included
            assert all(p.requires_grad for p in model.model.layers[i].parameters())


def test_frozen_blocks_get_no_grad_and_lose_optimizer_state():
    model = llama6()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built with every parameter trainable
    lisa = LisaCallback(model, n_layers=2, interval_steps=2, seed=3)
    names = {p: n for n, p in model.named_parameters()}
    seen_sets = []
    for step in range(8):
        active = lisa.step(step, optimizer=opt)
        seen_sets.append(tuple(active))
        opt.zero_grad()
        model(**batch(step)).loss.backward()
        for n, p in model.named_parameters():
            b = block_of(n)
            if b is not None and b not in active:
                assert p.grad is None, n
            else:
                assert p.grad is not None, n
        opt.step()
        state_blocks = {block_of(names[p]) for p in opt.state}
        # optimizer state only for the active blocks and the always-trained parameters
        assert state_blocks - {None} == set(active)
        assert {names[p] for p in opt.state if block_of(names[p]) is None} == {
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
        }
    assert len(set(seen_sets)) > 1


def test_switching_off_deletes_state_of_previous_blocks():
    model = llama6()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lisa = LisaCallback(model, n_layers=2, interval_steps=1, seed=0)
    first = lisa.step(0, optimizer=opt)
    model(**batch()).loss.backward()
    opt.step()
    block_params = {p for i in first for p in model.model.layers[i].parameters()}
    assert block_params <= set(opt.state)
    second = lisa.step(1)  # the optimizer given before is remembered
    gone = [i for i in first if i not in second]
    assert gone, "seed 0 should move at least one block"  # deterministic under the fixed seed
    for i in gone:
        for p in model.model.layers[i].parameters():
            assert p not in opt.state and p.grad is None and not p.requires_grad


def test_keep_state_option():
    model = llama6()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lisa = LisaCallback(model, n_layers=2, interval_steps=1, seed=0, reset_state=False)
    first = lisa.step(0, optimizer=opt)
    model(**batch()).loss.backward()
    opt.step()
    lisa.step(1)
    for i in first:
        assert all(p in opt.state for p in model.model.layers[i].parameters())


def test_trainer_run_switches(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = llama6()
    data = [{k: v[0] for k, v in batch(i).items()} for i in range(24)]
    lisa = LisaCallback(n_layers=2, interval_steps=2, seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[lisa])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert lisa.model is model
    assert [s for s, _ in lisa.history] == [0, 2, 4]
    assert len({tuple(a) for _, a in lisa.history}) > 1
    # the Trainer's optimizer held every block (built before the first switch) and now holds only active state
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    names = {p: n for n, p in model.named_parameters()}
    assert len(names) == sum(len(g["params"]) for g in opt.param_groups)
    assert {block_of(names[p]) for p in opt.state} - {None} == set(lisa.history[-1][1])
    # blocks never active were never updated; the last active ones were
    ever = {i for _, a in lisa.history for i in a}
    for n, p in model.named_parameters():
        b = block_of(n)
        if b is not None and b not in ever:
            assert torch.equal(p.detach(), before[n]), n
    for i in lisa.history[-1][1]:
        w = model.model.layers[i].self_attn.q_proj.weight
        assert not torch.equal(w.detach(), before[f"model.layers.{i}.self_attn.q_proj.weight"])
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_adapter_mode_on_peft_lora():
    model = get_peft_model(llama6(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora_names = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    lisa = LisaCallback(n_layers=2, interval_steps=1, seed=0)
    lisa.on_train_begin(None, None, None, model=model, optimizer=opt)
    for step in range(4):
        active = lisa.step(step)
        assert lisa.adapter_mode is True
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable <= lora_names  # embeddings / head / base weights stay frozen
        assert sorted({block_of(n) for n in trainable}) == active
        assert trainable == {n for n in lora_names if block_of(n) in active}
        opt.zero_grad()
        model(**batch(step)).loss.backward()
        opt.step()
        assert {block_of(n) for n, p in model.named_parameters() if p in opt.state} == set(active)


def test_bad_arguments():
    with pytest.raises(ValueError):
        LisaCallback(n_layers=0)
    with pytest.raises(ValueError):
        LisaCallback(interval_steps=0)
    with pytest.raises(ValueError):
        LisaCallback(llama6(), n_layers=7).step()
    with pytest.raises(ValueError):
        LisaCallback().step()


# ---------------------------------------------------------------------------------------------- modes, optimizer


def lora_llama6(seed=0):
    return get_peft_model(llama6(seed), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def is_lora(name):
    return "lora_" in name


OUTSIDE = ("embed_tokens", "model.norm", "lm_head")


def test_mode_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        LisaCallback(mode="partial")
    with pytest.raises(ValueError, match="contradicts"):
        LisaCallback(adapter_mode=True, mode="full")
    assert LisaCallback(adapter_mode=False).mode == "full"
    assert LisaCallback(adapter_mode=True, mode="adapter").mode == "adapter"
    assert LisaCallback().mode is None  # resolved at set-up: adapter on PEFT models, full otherwise
    with pytest.raises(ValueError, match="hybrid"):
        LisaCallback(llama6(), mode="hybrid").step(0)  # no PEFT adapters: nothing to tell base from adapter
    auto = LisaCallback(lora_llama6())
    auto.step(0)
    assert auto.mode == "adapter" and auto.adapter_mode is True


def test_hybrid_mode_switches_base_of_sampled_and_lora_of_the_rest():
    model = lora_llama6()
    names = {p: n for n, p in model.named_parameters()}
    candidates = lisa_parameters(model, mode="hybrid")
    cand_names = {names[p] for p in candidates}
    # every block parameter (base and LoRA) and the outside parameters, nothing else
    assert cand_names == {n for n, _ in model.named_parameters() if block_of(n) is not None or
                          any(k in n for k in OUTSIDE)}
    assert all(not p.requires_grad for n, p in model.named_parameters() if not is_lora(n))  # not modified
    opt = torch.optim.AdamW(candidates, lr=1e-3)
    lisa = LisaCallback(model, n_layers=2, interval_steps=1, seed=0, mode="hybrid")
    for step in range(4):
        active = lisa.step(step, optimizer=opt)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {n for n in cand_names if block_of(n) is None}
        expected |= {n for n in cand_names if block_of(n) in active and not is_lora(n)}
        expected |= {n for n in cand_names if block_of(n) not in active and block_of(n) is not None and is_lora(n)}
        assert trainable == expected
        opt.zero_grad()
        model(**batch(step)).loss.backward()
        opt.step()
        assert {names[p] for p in opt.state} == expected  # reset_state: only what trained this step
    assert len({tuple(a) for _, a in lisa.history}) > 1


def test_optimizer_missing_switched_parameters_raises():
    # full mode on a PEFT model switches base weights on; an optimizer over the LoRA weights would never update them
    model = lora_llama6()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    lisa = LisaCallback(model, n_layers=2, interval_steps=1, mode="full")
    with pytest.raises(ValueError, match="not in the optimizer"):
        lisa.step(0, optimizer=opt)
    # hybrid: the same optimizer misses the base weights and the embeddings
    with pytest.raises(ValueError, match=r"lisa_parameters"):
        LisaCallback(model, n_layers=2, mode="hybrid").step(0, optimizer=opt)
    # over lisa_parameters the check passes
    ok = torch.optim.AdamW(lisa_parameters(model, mode="full"), lr=1e-3)
    assert len(LisaCallback(model, n_layers=2, mode="full").step(0, optimizer=ok)) == 2


def test_ddp_without_find_unused_parameters_raises():
    from types import SimpleNamespace

    lisa = LisaCallback(llama6())
    with pytest.raises(ValueError, match="ddp_find_unused_parameters"):
        lisa.on_train_begin(SimpleNamespace(world_size=2, ddp_find_unused_parameters=False), None, None)
    lisa.on_train_begin(SimpleNamespace(world_size=2, ddp_find_unused_parameters=None), None, None)


@pytest.mark.parametrize("mode", ["hybrid", "full"])
def test_trainer_default_optimizer_holds_every_candidate(tmp_path, mode):
    """Out of the box with Trainer: the callback makes every candidate trainable before the optimizer is built."""
    from transformers import Trainer, TrainingArguments

    model = lora_llama6()
    names = {p: n for n, p in model.named_parameters()}
    candidates = {names[p] for p in lisa_parameters(model, mode=mode)}
    data = [{k: v[0] for k, v in batch(i).items()} for i in range(24)]
    lisa = LisaCallback(n_layers=2, interval_steps=2, seed=1, mode=mode)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[lisa])
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert {names[p] for g in opt.param_groups for p in g["params"]} == candidates
    sampled_ever = {i for _, a in lisa.history for i in a}
    unsampled_ever = {i for _, a in lisa.history for i in range(L) if i not in a}
    assert [s for s, _ in lisa.history] == [0, 2, 4] and sampled_ever != set(range(L))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    for i in range(L):
        base = {n for n in candidates if block_of(n) == i and not is_lora(n)}  # linear weights and block norms
        lora_b = {n for n in candidates if block_of(n) == i and "lora_B" in n}  # zero at init: any update shows
        # base weights move exactly in the blocks ever sampled; LoRA in those ever unsampled (hybrid) / sampled (full)
        assert (base <= changed) if i in sampled_ever else not (base & changed), (i, mode)
        lora_trained = i in (unsampled_ever if mode == "hybrid" else sampled_ever)
        assert (lora_b <= changed) if lora_trained else not (lora_b & changed), (i, mode)
    assert {n for n in changed if block_of(n) is None} == {n for n in candidates if block_of(n) is None}
