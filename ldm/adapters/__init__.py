"""Add-on networks loaded onto a built model (LoRA / LyCORIS: :mod:`ldm.adapters.lora`)."""
