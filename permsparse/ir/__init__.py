"""The model layer: one way to load, save, describe inputs, run and compare ONNX models — shared by every verb.

- :mod:`~permsparse.ir.model`: load (external data left on disk), input checks, the files a model consists of;
- :mod:`~permsparse.ir.save`: atomic, streaming save that refuses to write onto an input's files;
- :mod:`~permsparse.ir.inputs`: input records, the one shape syntax, random feeds;
- :mod:`~permsparse.ir.session`: the onnxruntime session factory;
- :mod:`~permsparse.ir.compare`: output comparison (the fold check's criterion);
- :mod:`~permsparse.ir.graph`: the onnx-graphsurgeon view with lazily read weights;
- :mod:`~permsparse.ir.weights`: the weight record (MatMul/Gemm B constants) and its N:M status;
- :mod:`~permsparse.ir.external`: external data, memory-mapped.
"""
