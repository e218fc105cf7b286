"""Training recipes: `accelerate launch recipes/train.py --config recipes/configs/<name>.yaml`."""
