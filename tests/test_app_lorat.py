"""LoRAT recipe (https://arxiv.org/abs/2403.05231): merged == unmerged, save → fresh-process load, the type
embedding and head saved as modules_to_save, GIoU on fixed boxes, the token layout, resume, and errors naming the
field."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_ext.apps import lorat
from peft_ext.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny_lorat.yaml"
SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, head_hidden=32)


def _lora(**kw):
    return LoraConfig(r=8, lora_alpha=8, target_modules=list(lorat.VIT_LINEARS),
                      modules_to_save=["type_embedding", "head"], init_lora_weights=False, **kw)


def _trained_like(config, seed=0):
    """A tracker with non-zero LoRA (init_lora_weights=False) and a perturbed head: unlike the base model. Also returns
    the base ViT's state (what the recipe writes to pretrained/vit.safetensors)."""
    base = lorat.build_tracker(config, seed)
    vit_state = {k: v.clone().contiguous() for k, v in base.vit.state_dict().items()}
    model = get_peft_model(base, _lora())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval(), vit_state


def test_merged_equals_unmerged_and_differs_from_base():
    config = lorat.LoRATConfig(**SMALL)
    data = lorat.tracking_pairs(config, "test", 6, seed=0)
    model, _ = _trained_like(config)
    with torch.no_grad():
        unmerged = model(data["template"], data["search"], data["template_mask"])
        with model.disable_adapter():
            base = model(data["template"], data["search"], data["template_mask"])
    stats = lorat.merged_vs_unmerged(model, data, repeats=1)
    assert (unmerged - base).abs().max() > 1e-3  # the adapter really changes the boxes
    # fp32 merge: W + s·BA computed once vs x·W + s·(x·A)·B; round-off is ~1e-7 on boxes in [0, 1]
    assert stats["max_abs_diff"] < 1e-5
    assert stats["unmerged_s"] > 0 and stats["merged_s"] > 0


def test_save_then_load_reproduces_boxes_and_saves_type_embedding_and_head(tmp_path):
    """In-process reload from disk with another seed (the fresh-process reload of every app is in
    tests/test_app_fresh_process.py)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = lorat.LoRATConfig(**SMALL)
    model, vit_state = _trained_like(config)
    (tmp_path / "pretrained").mkdir()
    save_file(vit_state, str(tmp_path / "pretrained" / lorat.VIT_FILE))
    model.save_pretrained(tmp_path / "lora" / "adapter")
    with safe_open(str(tmp_path / "lora" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("type_embedding" in k for k in keys) and any(".head." in k for k in keys)  # modules_to_save
    data = lorat.tracking_pairs(config, "test", 4, seed=3)
    loaded = lorat.load_lorat(tmp_path, config, seed=5)  # another seed: nothing may depend on the init
    with torch.no_grad():
        here = model(data["template"], data["search"], data["template_mask"])
        there = loaded(data["template"], data["search"], data["template_mask"])
    assert torch.allclose(there, here, atol=1e-6)  # same fp32 arithmetic


def test_giou_on_fixed_boxes():
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 1.0]])
    target = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [1.0, 0.0, 3.0, 1.0]])
    iou, giou = lorat.box_iou_giou(pred, target)
    # identical: 1, 1; disjoint, hull 3, union 2: IoU 0, GIoU -1/3; overlap 1 of union 3, hull 3: 1/3, 1/3
    assert torch.allclose(iou, torch.tensor([1.0, 0.0, 1 / 3]))
    assert torch.allclose(giou, torch.tensor([1.0, -1 / 3, 1 / 3]))
    loss = lorat.box_loss(pred[:1], target[:1], 5.0, 2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_template_uses_the_search_grids_top_left_positions_and_type_embedding():
    """The first layer's input: template tokens carry the search grid's top-left g×g positions plus their type row.

    Perturbations are random vectors, not constants: a constant shift of every hidden unit is removed by the pre-LN
    ViT's LayerNorms, so it would change nothing downstream."""
    config = lorat.LoRATConfig(**SMALL)
    data = lorat.tracking_pairs(config, "test", 2, seed=0)
    model = lorat.build_tracker(config, 0).eval()
    g, G = model.template_grid, model.search_grid
    mask = data["template_mask"]
    assert mask.shape == (2, g * g) and mask.any() and not mask.all()
    box = data["box"]
    assert ((box[:, 2:] - box[:, :2]) * config.search_size >= config.min_scale - 1e-4).all()
    seen = []
    model.vit.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))

    def first_layer_input():
        with torch.no_grad():
            out = model(data["template"], data["search"], mask)
        return seen[-1], out

    h0, out0 = first_layer_input()
    assert h0.shape == (2, g * g + G * G, config.hidden_size)
    assert out0.shape == (2, 4) and (out0[:, 2:] >= out0[:, :2]).all()
    gen = torch.Generator().manual_seed(0)
    grid = model.vit.embeddings.position_embeddings.data[:, 1:].view(1, G, G, -1)
    # 1) positions outside the top-left g×g sub-grid belong to search tokens only
    delta = torch.randn(config.hidden_size, generator=gen)
    grid[:, g:, :] += delta
    h1, out1 = first_layer_input()
    # exact: the template's inputs are computed from untouched parameters by the same arithmetic
    assert torch.equal(h1[:, :g * g], h0[:, :g * g])
    moved = torch.zeros(G, G, dtype=torch.bool)
    moved[g:, :] = True
    # fp32 sums of O(1) terms: round-off ~1e-6
    assert torch.allclose(h1[:, g * g:] - h0[:, g * g:], moved.view(-1, 1) * delta, atol=1e-5)
    assert not torch.allclose(out1, out0)  # and the boxes follow
    # 2) the top-left g×g sub-grid is shared: the template token (i, j) and the search token (i, j) both move
    delta2 = torch.randn(config.hidden_size, generator=gen)
    grid[:, :g, :g] += delta2
    h2, out2 = first_layer_input()
    assert torch.allclose(h2[:, :g * g] - h1[:, :g * g], delta2.expand(2, g * g, -1), atol=1e-5)
    shared = torch.zeros(G, G, dtype=torch.bool)
    shared[:g, :g] = True
    assert torch.allclose(h2[:, g * g:] - h1[:, g * g:], shared.view(-1, 1) * delta2, atol=1e-5)
    # 3) the foreground type row reaches exactly the template tokens under the target's mask
    delta3 = torch.randn(config.hidden_size, generator=gen)
    model.type_embedding.weight.data[lorat.TEMPLATE_FG] += delta3
    h3, out3 = first_layer_input()
    assert torch.allclose(h3[:, :g * g] - h2[:, :g * g], mask.unsqueeze(-1) * delta3, atol=1e-5)
    assert torch.equal(h3[:, g * g:], h2[:, g * g:])
    assert not torch.allclose(out3, out2)


def test_tiny_recipe_resume_redoes_nothing(tmp_path, monkeypatch):
    recipe = load_recipe(TINY, [f"output_dir={tmp_path}"])
    metrics = lorat.train_lorat_recipe(recipe, quiet=True)
    assert set(metrics["tracking"]) == {"lora", "frozen"} and metrics["merge"]["max_abs_diff"] < 1e-5
    assert json.loads((tmp_path / "metrics.json").read_text())["tracking"] == metrics["tracking"]

    def boom(*a, **k):
        raise AssertionError("a finished stage was redone")

    monkeypatch.setattr(lorat, "pretrain_vit", boom)
    monkeypatch.setattr(lorat, "train_tracker", boom)
    again = lorat.train_lorat_recipe(recipe, resume=True, quiet=True)
    for run in ("lora", "frozen"):  # same weights loaded back: same boxes (fp32, same arithmetic)
        assert again["tracking"][run] == pytest.approx(metrics["tracking"][run], abs=1e-6)


@pytest.mark.parametrize("override, field", [
    ("method.config.modules_to_save=[type_embedding]", "modules_to_save"),
    ("method.config.target_modules=[query]", "target_modules"),
    ("method.name=dylora", "method.name"),
    ("trainer.args.patch_size=5", "template_size"),
    ("trainer.args.noise=1.5", "noise"),
    ("trainer.args.max_scale=20", "max_scale"),
    ("trainer.args.unknown_key=1", "unknown_key"),
    ("data.name=gsm", "data.name"),
])
def test_bad_recipes_name_the_field(override, field):
    with pytest.raises(RecipeError, match=field):
        load_recipe(TINY, [override])
