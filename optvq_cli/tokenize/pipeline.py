"""The encode / decode / reconstruct jobs, as library functions the CLI wires up.

Every output is written atomically inside OUTPUT, a rerun skips outputs it made from the same
source, and a bad input is reported (path, reason) and skipped: the run goes on and its summary
counts it. What a job may write and delete in OUTPUT is ``outputs.Output``'s to decide.

Modules: ``outputs`` (folder ownership, manifest, journal, lock), ``batching`` (shared reading,
batching, decoding, writing), ``encode_job``, ``decode_job`` + ``token_sources``, ``reconstruct_job``.
"""

from optvq_cli.tokenize.batching import (
    Summary,
    canonical_ref,
    check_options,
    encoded_batches,
    make_preprocess,
)
from optvq_cli.tokenize.decode_job import decode
from optvq_cli.tokenize.encode_job import encode
from optvq_cli.tokenize.outputs import check_output_path, refuse_if_busy
from optvq_cli.tokenize.reconstruct_job import psnr_rgb, reconstruct
from optvq_cli.tokenize.token_sources import check_tokens_input, manifest_path, tokens_model

__all__ = [
    "Summary",
    "canonical_ref",
    "check_options",
    "check_output_path",
    "check_tokens_input",
    "decode",
    "encode",
    "encoded_batches",
    "make_preprocess",
    "manifest_path",
    "psnr_rgb",
    "reconstruct",
    "refuse_if_busy",
    "tokens_model",
]
