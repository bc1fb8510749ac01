"""Model files and where they live, without building a model: references, bundled models and
the hub (refs, hub), safetensors files and headers (files), config dialects and the authors' format
(configs, upstream). Nothing here imports optvq_cli.model."""

DEFAULT_MODEL = "default"  # the bundled model every command uses without --model; loads offline
