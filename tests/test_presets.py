"""Upstream-backed presets against independent oracles: RandLoRA's official scale (https://arxiv.org/abs/2502.00987),
Bone / bat on MiSS (https://arxiv.org/abs/2409.15371), DoRA + rsLoRA (Gazal-R1, https://arxiv.org/abs/2506.21594),
LayRA (https://arxiv.org/abs/2509.11414) with the CKA selection of https://github.com/c2d-usp/Layer-wise-LoRA-with-CKA,
and the loader of configs/*.yaml."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, MissConfig, PeftConfig, PeftModel, RandLoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.miss import MissLayer
from peft.tuners.randlora import RandLoraLayer

from conftest import randomize_adapter, rel_err, tiny_llama
from peft_ext.presets import (
    RandLoraPaperConfig,
    apply_paper_scaling,
    bone_preset,
    cka_layer_scores,
    cka_select_layers,
    dora_rslora_preset,
    layra_layers,
    layra_preset,
    linear_cka,
    load_bone_checkpoint,
    load_config,
    post_injection_paper_scaling,
    randlora_from_pretrained,
    randlora_preset,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
RL_TARGETS = ["q_proj", "v_proj", "down_proj"]  # min widths 64, 32, 64: n differs between layers


def layers_of(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


# ------------------------------------------------------------------------------------------------------------- RandLoRA


@pytest.fixture
def paper_hook(monkeypatch):
    """The registry hook proposed for peft_ext.registry (see the module docstring of peft_ext.presets.randlora):
    load RandLoRA configs through RandLoraPaperConfig and run post_injection_paper_scaling after inject_adapter.
    Installed here only while the registry does not install it itself."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.tuners.randlora import RandLoraModel
    from peft.utils import PeftType

    if getattr(RandLoraModel, "_peft_ext_patched", False):
        return
    orig = RandLoraModel.inject_adapter

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        orig(self, model, adapter_name, *args, **kwargs)
        post_injection_paper_scaling(self, adapter_name)

    monkeypatch.setattr(RandLoraModel, "inject_adapter", inject_adapter)
    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.RANDLORA, RandLoraPaperConfig)


def official_randlora_delta(layer: RandLoraLayer, alpha: float, adapter: str = "default") -> torch.Tensor:
    """ΔW = α/(r√n) · Σ_j B_j diag(λ_{:,j}) A diag(γ_j), written from the official formula with a loop over bases.

    B_j's i-th column is the column of the flattened shared basis B[:max, :n, :] that the official code pairs with
    (rank i, basis j): flat index i·n + j (official peft fork, RandLoraLayer.get_scaled_bases)."""
    r = layer.r[adapter]
    d_in, d_out = layer.in_features, layer.out_features
    lo, hi = min(d_in, d_out), max(d_in, d_out)
    n = math.ceil(lo / r)
    A = layer.randlora_A[adapter][:, 0, :lo].double()
    B_flat = layer.randlora_B[adapter][:hi, :n, :].reshape(hi, n * r).double()
    lam = layer.randlora_lambda[adapter].double()
    gam = layer.randlora_gamma[adapter].double()
    delta = torch.zeros(hi, lo, dtype=torch.float64)
    for j in range(n):
        B_j = torch.stack([B_flat[:, i * n + j] for i in range(r)], dim=1)
        delta += B_j @ torch.diag(lam[:, j]) @ A @ torch.diag(gam[j])
    delta *= alpha / (r * math.sqrt(n))
    return (delta if lo == d_in else delta.T).float()


def test_paper_scaling_equals_official_formula_per_layer(paper_hook):
    r, alpha = 12, 24  # n = ⌈64/12⌉ = 6 for q/down, ⌈32/12⌉ = 3 for v (non-integer ratios)
    model = get_peft_model(tiny_llama(), randlora_preset(r=r, target_modules=RL_TARGETS))
    randomize_adapter(model, std=0.2)
    layers = layers_of(model, RandLoraLayer)
    assert {math.ceil(min(m.in_features, m.out_features) / r) for m in layers.values()} == {3, 6}
    torch.manual_seed(0)
    for name, layer in layers.items():
        n = math.ceil(min(layer.in_features, layer.out_features) / r)
        assert layer.scaling["default"] == pytest.approx(alpha / (r * math.sqrt(n)), rel=1e-12), name
        x = torch.randn(5, layer.in_features)
        expected = x @ (layer.get_base_layer().weight + official_randlora_delta(layer, alpha)).T
        with torch.no_grad():
            got = layer(x)
        assert rel_err(got, expected) <= 1e-5, name  # fp32 forward vs fp64 oracle


def test_upstream_scale_is_sqrt_n_larger_at_equal_alpha(paper_hook):
    up = get_peft_model(tiny_llama(), randlora_preset(paper_scaling=False, r=8, randlora_alpha=16,
                                                      target_modules=RL_TARGETS))
    paper = get_peft_model(tiny_llama(), randlora_preset(r=8, target_modules=RL_TARGETS))
    assert type(up.peft_config["default"]) is RandLoraConfig
    for name, layer in layers_of(up, RandLoraLayer).items():
        n = math.ceil(min(layer.in_features, layer.out_features) / 8)
        assert layer.scaling["default"] == 2.0
        assert layers_of(paper, RandLoraLayer)[name].scaling["default"] == pytest.approx(2.0 / math.sqrt(n))


def test_apply_paper_scaling_is_idempotent_and_marks_config():
    model = get_peft_model(tiny_llama(), RandLoraConfig(r=8, randlora_alpha=16, target_modules=RL_TARGETS))
    first = apply_paper_scaling(model)
    second = apply_paper_scaling(model)
    assert first == second and len(first) == 6
    assert isinstance(model.peft_config["default"], RandLoraPaperConfig)
    assert model.peft_config["default"].paper_scaling
    for name, scale in first.items():
        layer = model.get_submodule(name)
        n = math.ceil(min(layer.in_features, layer.out_features) / 8)
        assert scale == pytest.approx(16 / (8 * math.sqrt(n)))


def test_save_load_keeps_paper_scaling(paper_hook, tmp_path, llama_inputs):
    model = get_peft_model(tiny_llama(), randlora_preset(r=12, target_modules=RL_TARGETS)).eval()
    randomize_adapter(model, std=0.2)
    with torch.no_grad():
        expected = model(input_ids=llama_inputs).logits
    scales = {n: m.scaling["default"] for n, m in layers_of(model, RandLoraLayer).items()}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["paper_scaling"] is True

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(loaded.peft_config["default"], RandLoraPaperConfig)
    assert {n: m.scaling["default"] for n, m in layers_of(loaded, RandLoraLayer).items()} == scales
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=llama_inputs).logits, expected)

    loaded.load_adapter(tmp_path, adapter_name="second")  # load_adapter → add_adapter → inject_adapter
    for name, layer in layers_of(loaded, RandLoraLayer).items():
        assert layer.scaling["second"] == scales[name]


def test_upstream_adapter_round_trip_keeps_upstream_scale(paper_hook, tmp_path, llama_inputs):
    model = get_peft_model(tiny_llama(), RandLoraConfig(r=8, randlora_alpha=16, target_modules=RL_TARGETS)).eval()
    randomize_adapter(model, std=0.2)
    with torch.no_grad():
        expected = model(input_ids=llama_inputs).logits
    model.save_pretrained(tmp_path)
    assert "paper_scaling" not in json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not getattr(loaded.peft_config["default"], "paper_scaling", False)
    assert all(m.scaling["default"] == 2.0 for m in layers_of(loaded, RandLoraLayer).values())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=llama_inputs).logits, expected)


def test_randlora_from_pretrained_without_hook(tmp_path, llama_inputs):
    model = get_peft_model(tiny_llama(), RandLoraConfig(r=12, randlora_alpha=24, target_modules=RL_TARGETS)).eval()
    randomize_adapter(model, std=0.2)
    apply_paper_scaling(model)
    with torch.no_grad():
        expected = model(input_ids=llama_inputs).logits
    model.save_pretrained(tmp_path)
    loaded = randlora_from_pretrained(tiny_llama(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=llama_inputs).logits, expected)


def test_randlora_preset_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown argument"):
        randlora_preset(rank=8)
    with pytest.raises(ValueError, match="randlora_preset.r"):
        randlora_preset(r=0)
    with pytest.raises(ValueError, match="paper_scaling"):
        randlora_preset(paper_scaling="yes")


# ----------------------------------------------------------------------------------------------------------------- Bone

BONE_TARGETS = ["q_proj", "v_proj", "down_proj"]


def bone_oracle_weight(W: torch.Tensor, M: torch.Tensor, mode: str) -> torch.Tensor:
    """The adapted weight written from the paper's formulas (loops over blocks)."""
    d_out, d_in = W.shape
    W, M = W.double(), M.double()
    if mode == "bone":  # ΔW[:, k·r+i] = M[i, :]
        r = M.shape[0]
        delta = torch.zeros_like(W)
        for col in range(d_in):
            delta[:, col] = M[col % r]
        return (W + delta).float()
    r = M.shape[-1]  # bat: block (a, c) → W_ac + W_ac M_a + M_a
    out = W.clone()
    for a in range(d_out // r):
        for c in range(d_in // r):
            blk = W[a * r:(a + 1) * r, c * r:(c + 1) * r]
            out[a * r:(a + 1) * r, c * r:(c + 1) * r] = blk + blk @ M[a] + M[a]
    return out.float()


@pytest.mark.parametrize("mode,r", [("bone", 24), ("bat", 16)])  # r=24 does not divide 64: the padded path
def test_bone_forms(mode, r, llama_inputs):
    model = get_peft_model(tiny_llama(), bone_preset(mode=mode, r=r, target_modules=BONE_TARGETS)).eval()
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=llama_inputs).logits
    with torch.no_grad():
        assert torch.equal(model(input_ids=llama_inputs).logits, base)  # M = 0 → the base model, exactly
    randomize_adapter(model, std=0.05)
    torch.manual_seed(0)
    for name, layer in layers_of(model, MissLayer).items():
        x = torch.randn(3, layer.in_features)
        expected = x @ bone_oracle_weight(layer.get_base_layer().weight, layer.miss_block["default"], mode).T
        with torch.no_grad():
            assert rel_err(layer(x), expected) <= 1e-5, name
    with torch.no_grad():
        unmerged = model(input_ids=llama_inputs).logits
        model.merge_adapter()
        merged = model(input_ids=llama_inputs).logits
        model.unmerge_adapter()
        again = model(input_ids=llama_inputs).logits
    assert rel_err(merged, unmerged) <= 1e-5
    assert rel_err(again, unmerged) <= 1e-4  # bat unmerge inverts I + M in fp32


@pytest.mark.parametrize("mode,r", [("bone", 24), ("bat", 16)])
def test_bone_checkpoint_loads_into_miss(mode, r, tmp_path, llama_inputs):
    from safetensors.torch import load_file, save_file

    model = get_peft_model(tiny_llama(), bone_preset(mode=mode, r=r, target_modules=BONE_TARGETS)).eval()
    randomize_adapter(model, std=0.05)
    with torch.no_grad():
        expected = model(input_ids=llama_inputs).logits
    model.save_pretrained(tmp_path / "miss")
    # An adapter as PEFT <= 0.17 saved it under BoneConfig: peft_type BONE, no MiSS-only fields, bone_block keys.
    cfg = json.loads((tmp_path / "miss" / "adapter_config.json").read_text())
    for key in ("miss_dropout", "mini_r"):
        cfg.pop(key)
    cfg["peft_type"] = "BONE"
    bone_dir = tmp_path / "bone"
    bone_dir.mkdir()
    (bone_dir / "adapter_config.json").write_text(json.dumps(cfg))
    weights = load_file(tmp_path / "miss" / "adapter_model.safetensors")
    assert weights and all(k.endswith(".miss_block") for k in weights)
    save_file({k.replace(".miss_block", ".bone_block"): v for k, v in weights.items()},
              bone_dir / "adapter_model.safetensors")

    loaded = load_bone_checkpoint(tiny_llama(), str(bone_dir))
    assert isinstance(loaded.peft_config["default"], MissConfig)
    assert loaded.peft_config["default"].init_weights == (True if mode == "bone" else "bat")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=llama_inputs).logits, expected)


def test_bone_preset_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        bone_preset(mode="mini")
    with pytest.raises(ValueError, match="init_weights"):
        bone_preset(init_weights="bat")
    with pytest.raises(ValueError, match="unknown argument"):
        bone_preset(rank=8)


# ------------------------------------------------------------------------------------------------------- DoRA + rsLoRA


def test_dora_rslora_round_trip_and_merge(tmp_path, llama_inputs):
    cfg = dora_rslora_preset(4, 8, lora_dropout=0.0)
    assert cfg.use_dora and cfg.use_rslora and cfg.target_modules == "all-linear"
    cfg.save_pretrained(tmp_path)
    again = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(again, LoraConfig) and again.to_dict() == cfg.to_dict()

    model = get_peft_model(tiny_llama(), again).eval()
    layers = layers_of(model, LoraLayer)
    assert len(layers) == 2 * 7 and all(m.use_dora["default"] for m in layers.values())  # all linear but lm_head
    assert all(m.scaling["default"] == 8 / math.sqrt(4) for m in layers.values())  # rsLoRA: α/√r
    randomize_adapter(model, std=0.05)
    with torch.no_grad():
        unmerged = model(input_ids=llama_inputs).logits
        model.merge_adapter()
        merged = model(input_ids=llama_inputs).logits
        model.unmerge_adapter()
    assert rel_err(merged, unmerged) <= 1e-5


def test_dora_rslora_rejects_bad_input():
    with pytest.raises(ValueError, match="use_dora"):
        dora_rslora_preset(8, 16, use_dora=False)
    with pytest.raises(ValueError, match="dora_rslora_preset.r"):
        dora_rslora_preset(0, 16)


# ---------------------------------------------------------------------------------------------------------------- LayRA


def tiny_llama_layers(n_layers: int, seed: int = 0):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    cfg = tiny_llama_config()
    cfg.num_hidden_layers = n_layers
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def test_layra_layer_sets():
    assert layra_layers(30, 2, 3) == [0, 1, 27, 28, 29]
    assert layra_layers(4, 0, 1) == [3]
    assert layra_layers(4, 4, 0) == [0, 1, 2, 3]
    for bad in [(4, 3, 2), (4, 0, 0), (0, 1, 1), (4, -1, 1)]:
        with pytest.raises(ValueError):
            layra_layers(*bad)


def test_only_selected_layers_carry_adapters():
    model = get_peft_model(tiny_llama_layers(5), layra_preset(n_layers=5, n_first=1, n_last=2, r=4))
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n in layers_of(model, LoraLayer)}
    assert adapted == {0, 3, 4}
    assert len(layers_of(model, LoraLayer)) == 3 * 7  # the seven projections of each selected block
    explicit = layra_preset(layers=[2, 0], r=4)
    assert explicit.layers_to_transform == [0, 2] and explicit.layers_pattern == "layers"
    with pytest.raises(ValueError, match="string"):
        layra_preset(n_layers=5, n_first=1, n_last=1, target_modules="all-linear")


def gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA from centred Gram matrices: HSIC(K, L)/√(HSIC(K, K)·HSIC(L, L)), K = XXᵀ, L = YYᵀ."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = H @ x @ x.T @ H, H @ y @ y.T @ H
    return float((K * L).sum() / torch.sqrt((K * K).sum() * (L * L).sum()))


def test_linear_cka_matches_gram_form():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 7, generator=gen), torch.randn(20, 11, generator=gen)
    assert linear_cka(x, y) == pytest.approx(gram_cka(x, y), abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=gen))
    assert linear_cka(x, 3 * x @ q + 5) == pytest.approx(1.0, abs=1e-10)  # invariant to rotation, scale, shift


def test_cka_scores_and_selection_on_padded_batches():
    model = tiny_llama_layers(4)
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 9, 7, 3, 8, 6]
    seqs = [torch.randint(1, 128, (n,), generator=gen) for n in lengths]
    batches = []
    for i in range(0, len(seqs), 3):  # right padding, as the official script
        group = seqs[i:i + 3]
        width = max(len(s) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(group):
            ids[row, :len(s)], mask[row, :len(s)] = s, 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    scores = cka_layer_scores(model, batches)
    # Oracle: each sequence alone, no padding; its last token at every hidden state.
    with torch.no_grad():
        reps = [model(input_ids=s[None], output_hidden_states=True).hidden_states for s in seqs]
    feats = [torch.stack([h[i][0, -1] for h in reps]) for i in range(len(reps[0]))]
    expected = [gram_cka(feats[i], feats[i + 1]) for i in range(4)]
    assert scores == pytest.approx(expected, abs=1e-5)  # fp32 hidden states, padded vs unpadded attention
    lowest_two = sorted(sorted(range(4), key=lambda i: expected[i])[:2])
    assert cka_select_layers(model, batches, fraction=0.5) == lowest_two
    assert cka_select_layers(model, batches, fraction=0.25) == [min(range(4), key=lambda i: expected[i])]
    with pytest.raises(ValueError, match="fraction"):
        cka_select_layers(model, batches, fraction=0.1)


# -------------------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_builds(path):
    assert isinstance(load_config(path), PeftConfig)


def test_own_configs_build_the_paper_settings():
    root = CONFIGS[0].parent
    paper = load_config(root / "randlora_paper.yaml")
    assert isinstance(paper, RandLoraPaperConfig) and paper.paper_scaling and paper.randlora_alpha == 2 * paper.r
    upstream = load_config(root / "randlora_upstream.yaml")
    assert type(upstream) is RandLoraConfig and upstream.randlora_alpha == 20 * upstream.r
    assert load_config(root / "bone.yaml").init_weights is True
    assert load_config(root / "bone_bat.yaml").init_weights == "bat"
    gazal = load_config(root / "gazal_dora_rslora.yaml")
    assert gazal.use_dora and gazal.use_rslora
    layra = load_config(root / "layra.yaml")
    assert layra.layers_to_transform == [0, 1, 2, 3, 26, 27, 28, 29]
    assert type(load_config(root / "lora_ga.yaml")) is LoraConfig


@pytest.mark.parametrize(
    "text,match",
    [
        ("method: lora\nconfig: {r: 4}\nextra: 1\n", r"unknown top-level key\(s\) \['extra'\]"),
        ("method: nope\n", "unknown method 'nope'"),
        ("method: lora\nconfig: {rank: 4}\n", r"unknown key\(s\) \['rank'\]"),
        ("method: bone_preset\nconfig: {mode: bat, rank: 4}\n", r"unknown key\(s\) \['rank'\]"),
        ("config: {r: 4}\n", "missing the `method` key"),
        ("- method\n", "must be a mapping"),
    ],
)
def test_load_config_is_strict(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path)


def test_mola_preset_names_follow_the_paper():
    """MoLA-▽ ("inverted triangle", the paper's best: most experts in the top layers) is mola_inverted_triangle.yaml,
    MoLA-△ ("triangle") is mola_triangle.yaml; built on a 4-layer Llama, layer i gets the i-th count."""
    from peft_ext.tuners.mola import experts_per_layer

    root = CONFIGS[0].parent
    assert not (root / "mola_inverted.yaml").exists()  # the old, swapped name is gone
    for name, counts in (("mola_inverted_triangle.yaml", [2, 4, 6, 8]), ("mola_triangle.yaml", [8, 6, 4, 2])):
        config = load_config(root / name)
        model = get_peft_model(tiny_llama_layers(4), config)
        assert experts_per_layer(model) == dict(enumerate(counts)), name
        header = "".join((root / name).read_text().split("\n")[:2])
        assert ("MoLA-▽" if counts[0] < counts[-1] else "MoLA-△") in header, name


def tiny_mixtral(seed: int = 0):
    """A tiny random Mixtral (hidden 64, 2 layers, 4 experts, top-2) with transformers-v5 fused experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).eval()


def test_uni_moe_preset_puts_lora_on_every_expert_of_a_moe_base(llama_inputs):
    """Uni-MoE (METHODS §10.9): plain LoRA on the attention and on each existing expert (fused 3-D parameters through
    target_parameters), routing by the base model's gates; only LoRA parameters train."""
    from peft.tuners.lora.layer import ParamWrapper

    root = CONFIGS[0].parent
    config = load_config(root / "uni_moe.yaml")
    assert type(config) is LoraConfig and (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.0)
    base = tiny_mixtral()
    n_experts, _, d_in = base.model.layers[0].mlp.experts.gate_up_proj.shape  # [E, 2·I, d]
    with torch.no_grad():
        expected = base(input_ids=llama_inputs).logits
    model = get_peft_model(base, config)
    wrapped = {(n.split(".mlp.")[0], m.parameter_name) for n, m in model.named_modules() if isinstance(m, ParamWrapper)}
    layers = {f"base_model.model.model.layers.{i}" for i in range(2)}
    assert wrapped == {(layer, p) for layer in layers for p in ("gate_up_proj", "down_proj")}
    for m in model.modules():
        if isinstance(m, ParamWrapper) and m.parameter_name == "gate_up_proj":
            assert m.lora_A["default"].weight.shape == (n_experts * 8, d_in)  # one rank-8 LoRA per expert
    with torch.no_grad():
        assert torch.equal(model(input_ids=llama_inputs).logits, expected)  # B = 0: the base model exactly
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)
    assert any("experts" in n for n in trainable) and any("self_attn.q_proj" in n for n in trainable)
    randomize_adapter(model, std=0.05)
    model.train()
    model(input_ids=llama_inputs, labels=llama_inputs).loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen parameter {name} received a gradient"
    with torch.no_grad():
        model.eval()
        moved = (model(input_ids=llama_inputs).logits - expected).abs().max()
        with model.disable_adapter():
            assert torch.equal(model(input_ids=llama_inputs).logits, expected)
    assert moved > 1e-4  # the expert LoRAs change the output


def test_uni_moe_dense_is_the_mola_analogue_and_says_so():
    root = CONFIGS[0].parent
    config = load_config(root / "uni_moe_dense.yaml")
    assert type(config).__name__ == "MolaConfig" and config.num_experts == 4 and config.top_k == 2
    assert "DEVIATION" in (root / "uni_moe_dense.yaml").read_text()


@pytest.mark.parametrize(
    "text,field",
    [
        ("method: lora_mixer\nconfig: {temperature: .inf}\n", "LoraMixerConfig.temperature"),
        ("method: prompt_aware_lora\nconfig: {clamp: .inf}\n", "PromptAwareLoraConfig.clamp"),
        ("method: prompt_aware_lora\nconfig: {init_scale: 'yes'}\n", "PromptAwareLoraConfig.init_scale"),
    ],
)
def test_yaml_infinities_and_non_bools_are_refused(tmp_path, text, field):
    """YAML spells infinity `.inf`; such values (and strings for bool fields) raise an error naming the field."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{field} must be"):
        load_config(path)


def test_tara_header_names_the_real_aux_loss_api():
    from peft_ext.tuners._shared.base import ExtModel

    text = (CONFIGS[0].parent / "tara.yaml").read_text()
    assert "model.base_model.aux_loss()" in text and "labels" in text
    assert callable(ExtModel.aux_loss)
