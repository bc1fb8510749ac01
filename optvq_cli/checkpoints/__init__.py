"""Where models live on disk and on the hub: model references, the hub client, safetensors
headers and the authors' checkpoint format."""
