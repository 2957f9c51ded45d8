"""Vanilla LoRA: PEFT's default init (Kaiming-uniform A, B = 0), nothing absorbed."""

from .base import Initializer


class Vanilla(Initializer):
    name = "vanilla"
