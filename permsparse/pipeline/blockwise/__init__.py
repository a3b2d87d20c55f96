"""Block-wise pruning: calibration, permutation learning, reconstruction and weight tuning one Transformer block at a
time on PyTorch forwards of the model's own ONNX blocks (:mod:`permsparse.torchgraph`). See :mod:`.engine`."""
