"""Add-ons loaded onto a built model from their own files: textual-inversion embeddings
(:mod:`ldm.adapters.embeddings`) and LoRA / LyCORIS (:mod:`ldm.adapters.lora`)."""
