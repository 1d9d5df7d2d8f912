"""Training scripts and configs that reproduce the papers (see README)."""
