"""Where models live on disk and on the hub: model references, the hub client, safetensors
headers and the authors' checkpoint format."""

DEFAULT_MODEL = "default"  # the bundled model every command uses without --model; loads offline
