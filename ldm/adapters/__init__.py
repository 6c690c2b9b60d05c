"""Add-ons loaded into a model from their own files: textual-inversion embeddings, LoRA."""
