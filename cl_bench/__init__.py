"""cl_bench: continual learning of LLMs with LoRA adapters, one Hydra config per method."""

__version__ = "0.1.0"
