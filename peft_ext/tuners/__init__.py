"""peft-ext tuners, one folder per method (config.py, layer.py, model.py), PEFT's own layout."""
