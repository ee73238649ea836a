"""Models homefire builds offline (no hub): a tokenizer trained on text that ships with
Python and Llama-shaped models initialised from a config."""

from homefire.models.build import DEMO_RECIPES, ModelRecipe, build_model, ensure_model

__all__ = ["DEMO_RECIPES", "ModelRecipe", "build_model", "ensure_model"]
