"""Images to tokens and back: the token file formats, output folders optvq owns, and the
encode / decode / reconstruct pipelines."""
