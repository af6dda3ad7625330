"""Application papers as runnable recipes: one module per paper (its trainer name in a recipe is the module name).

Each module defines ``RECIPE = dict(config=<config dataclass>, entry=<train_*_recipe(recipe, resume, quiet)>,
data=(data.name values), tasks=(model.task values), models=(extra model.name values))``; ``peft-ext train`` validates
``trainer.args`` against the config class and calls the entry point (see ``peft_ext.recipe``).
"""
