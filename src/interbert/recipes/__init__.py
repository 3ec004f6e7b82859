"""Recipes: thin scripts over the library (pretrain, fine-tune, evaluate, demo)."""
