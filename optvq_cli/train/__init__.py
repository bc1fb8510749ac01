"""Training a tokenizer: data sets, losses, the run config and the training loop with its
checkpoints. Nothing outside train/ and the CLI imports it."""
