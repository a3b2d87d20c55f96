"""Data work on onnxruntime: feeds (text, tokens, images), built-in real text, tokenizers, calibration statistics and
quality metrics. :mod:`permsparse.optimizer` stays pure numerics; this package feeds it."""
