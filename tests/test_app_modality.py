"""Per-modality LoRA recipes on the tiny LLaVA-like model: RegionBLIP (https://arxiv.org/abs/2308.02299, one branch
per modality picked by ``route_ids=<modality>`` per call) and Arcana's MM-LoRA (https://arxiv.org/abs/2410.13733,
vision / language branches picked per token by ``modality=``). Routing: a branch changes only its modality's tokens;
gradients reach only the routed branch; merging is refused as in the official code; save → load reproduces the
outputs (in a fresh process: tests/test_app_fresh_process.py)."""

from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_ext.apps import _modality as M
from peft_ext.apps import arcana, regionblip
from peft_ext.recipe import RecipeError, load_recipe
from peft_ext.tuners.gated_lora import GatedLoraLayer

ROOT = Path(__file__).resolve().parent.parent
TINY_RB = ROOT / "recipes" / "tiny_regionblip.yaml"
TINY_AR = ROOT / "recipes" / "tiny_arcana.yaml"
SMALL = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, points=4, pretrain_steps=0)


def _model(recipe, config):
    return get_peft_model(M.build_model(config, 0), M.gated_config(recipe)).eval()


def _set_branch(model, branch: str, seed: int):
    """Give one branch's up matrix (B, zero at init) random values: that branch now changes its layers' outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, GatedLoraLayer):
                cols = layer._slice("default", layer.branches["default"].index(branch))
                up = layer.gated_lora_up["default"].weight
                up[:, cols] = 0.5 * torch.randn(up[:, cols].shape, generator=gen)


def _logits(model, data, **route):
    with torch.no_grad():
        kwargs = {} if data["features"] is None else {"features": data["features"],
                                                      "feature_modality": data["modality"]}
        return model(input_ids=data["input_ids"], **kwargs, **route)


def test_regionblip_a_modality_branch_changes_only_its_modalitys_calls():
    recipe = load_recipe(TINY_RB, [])
    config = regionblip.RegionBLIPConfig(**SMALL)
    model = _model(recipe, config)
    image = M.caption_data("image", "test", 4, config.points, 0)
    cloud = M.caption_data("pointcloud", "test", 4, config.points, 0)
    with model.disable_adapter():
        base_image, base_cloud = _logits(model, image), _logits(model, cloud)
    _set_branch(model, "image", seed=1)
    img = _logits(model, image, **regionblip.route_per_modality(image))
    pcl = _logits(model, cloud, **regionblip.route_per_modality(cloud))
    assert (img - base_image).abs().max() > 1e-3  # the image branch acts on image calls
    assert torch.equal(pcl, base_cloud)  # and not at all on point-cloud calls (their branch adds exact zeros)
    _set_branch(model, "pointcloud", seed=2)
    assert torch.equal(_logits(model, image, **regionblip.route_per_modality(image)), img)  # image calls unmoved
    assert (_logits(model, cloud, **regionblip.route_per_modality(cloud)) - base_cloud).abs().max() > 1e-3
    text = M.count_data("test", 4, 0)  # text-only batches run the untouched base (route -1)
    with model.disable_adapter():
        base_text = _logits(model, text)
    assert torch.equal(_logits(model, text, **regionblip.route_per_modality(text)), base_text)


def test_arcana_vision_branch_only_on_image_tokens_language_branch_only_on_text_tokens():
    recipe = load_recipe(TINY_AR, [])
    config = arcana.ArcanaConfig(**SMALL)
    model = _model(recipe, config)
    image = M.caption_data("image", "test", 4, config.points, 0)
    k = M.prefix_length(image)
    seen = []
    q = next(m for n, m in model.named_modules() if isinstance(m, GatedLoraLayer) and n.endswith("layers.0.self_attn"
                                                                                                  ".q_proj"))
    q.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    with model.disable_adapter():
        base = _logits(model, image)
    base_q = seen[-1]
    _set_branch(model, "vision", seed=1)
    vis = _logits(model, image, **arcana.route_mm(image))
    vis_q = seen[-1]
    # first layer: same input at every position, so the q_proj rows differ exactly where the vision branch is routed
    assert torch.equal(vis_q[:, k:], base_q[:, k:]) and (vis_q[:, :k] - base_q[:, :k]).abs().max() > 1e-3
    assert (vis[:, :k] - base[:, :k]).abs().max() > 1e-3
    _set_branch(model, "language", seed=2)
    both = _logits(model, image, **arcana.route_mm(image))
    both_q = seen[-1]
    assert torch.equal(both_q[:, :k], vis_q[:, :k]) and (both_q[:, k:] - vis_q[:, k:]).abs().max() > 1e-3
    # causal attention: the image positions see only image tokens, so the language branch cannot reach them
    assert torch.equal(both[:, :k], vis[:, :k]) and (both[:, k:] - vis[:, k:]).abs().max() > 1e-3


def test_per_branch_gradients_follow_the_route():
    config = regionblip.RegionBLIPConfig(**SMALL)
    model = _model(load_recipe(TINY_RB, []), config).train()
    batch = M.caption_data("pointcloud", "train", 4, config.points, 0)
    torch.nn.functional.cross_entropy(M.answer_logits(model, batch, **regionblip.route_per_modality(batch)),
                                      batch["answer"]).backward()
    grads = M.branch_grad_norms(model)
    assert grads["pointcloud"] > 0 and grads["image"] == 0.0  # exact: unrouted columns are zeroed by a select
    projector = dict(model.named_parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in projector.items() if "image_projector" in n)

    config = arcana.ArcanaConfig(**SMALL)
    model = _model(load_recipe(TINY_AR, []), config).train()
    text = M.count_data("train", 4, 0)  # text only: every token is a language token
    torch.nn.functional.cross_entropy(M.answer_logits(model, text, **arcana.route_mm(text)), text["answer"]).backward()
    grads = M.branch_grad_norms(model)
    assert grads["language"] > 0 and grads["vision"] == 0.0
    model.zero_grad()
    image = M.caption_data("image", "train", 4, config.points, 0)  # both kinds of token: both branches learn
    torch.nn.functional.cross_entropy(M.answer_logits(model, image, **arcana.route_mm(image)),
                                      image["answer"]).backward()
    grads = M.branch_grad_norms(model)
    assert grads["language"] > 0 and grads["vision"] > 0


@pytest.mark.parametrize("path", [TINY_RB, TINY_AR], ids=["regionblip", "arcana"])
def test_merge_is_refused_and_a_default_route_is_rejected(path):
    recipe = load_recipe(path, [])
    model = _model(recipe, M.ModalityConfig(**SMALL))
    assert "no default_route" in M.merge_refusal(model)  # merge_and_unload() raises, naming why
    branch = recipe.method.config["branches"][0]
    with pytest.raises(RecipeError, match="default_route"):
        load_recipe(path, [f"method.config.default_route={branch}"])


def test_bad_recipes_name_the_field():
    with pytest.raises(RecipeError, match="branches"):
        load_recipe(TINY_RB, ["method.config.branches=[image, region]"])
    with pytest.raises(RecipeError, match="branches"):
        load_recipe(TINY_AR, ["method.config.branches=[vision, language, audio]"])
    with pytest.raises(RecipeError, match="method.name"):
        load_recipe(TINY_AR, ["method.name=lora", "method.config={r: 4, target_modules: [q_proj]}"])
    with pytest.raises(RecipeError, match="target_modules"):
        load_recipe(TINY_RB, ["method.config.target_modules=[lm_head]"])


def _outputs(model, data: dict, route_fn) -> dict:
    return {task: _logits(model, d, **route_fn(d))[:, -1] for task, d in data.items()}


def test_tiny_recipes_save_and_reload_with_another_seed(tmp_path):
    """The trained variants reload from disk (with another seed: every weight comes from the files) to the same
    outputs; the fresh-process reload of every app is in tests/test_app_fresh_process.py."""
    runs = {"regionblip": (TINY_RB, regionblip.train_regionblip_recipe, "per_modality", regionblip.route_per_modality,
                           regionblip.regionblip_config_from_recipe),
            "arcana": (TINY_AR, arcana.train_arcana_recipe, "mm_lora", arcana.route_mm,
                       arcana.arcana_config_from_recipe)}
    for name, (path, train, variant, route, config_of) in runs.items():
        recipe = load_recipe(path, [f"output_dir={tmp_path / name}"])
        metrics = train(recipe, quiet=True)
        assert "no default_route" in metrics["merge_refused"]
        config = config_of(recipe)
        data = {"image": M.caption_data("image", "test", 4, config.points, 0), "text": M.count_data("test", 4, 0)}
        model = M.load_variant(tmp_path / name / variant, config, recipe.seed)
        here = _outputs(model, data, route)
        with model.disable_adapter():
            base = _outputs(model, data, route)
        # the trained adapter (projector and branches) changes the image outputs
        assert (here["image"] - base["image"]).abs().max() > 1e-4
        again = _outputs(M.load_variant(tmp_path / name / variant, config, seed=7), data, route)
        for task in data:  # same weights and fp32 arithmetic
            assert torch.allclose(again[task], here[task], atol=1e-6)
        assert M.accuracy(model, M.caption_data("image", "test", config.eval_examples, config.points, 0), route) == \
            metrics["accuracy"][next(iter(metrics["accuracy"]))]["image"]  # the recipe measured this very model
