"""permsparse.optimizer: the numerics of permutation learning and reconstruction, free of ONNX.

- registries (module-level dicts filled by a ``register`` decorator, read by the CLI and the config):
  :mod:`~permsparse.optimizer.methods` (``METHOD_FACTORIES``: identity, lsa, channel_swap, learned) and
  :mod:`~permsparse.optimizer.importance` (``IMPORTANCE_REGISTRY``: magnitude, wanda, ria, obs; ``masking_score`` is
  the pipeline's one entry point);
- problems and results: :mod:`~permsparse.optimizer.base`; methods: :mod:`~permsparse.optimizer.baselines`,
  :mod:`~permsparse.optimizer.swap`, :mod:`~permsparse.optimizer.learned` (+ :mod:`~permsparse.optimizer.outlearn`),
  sharing :mod:`~permsparse.optimizer.relax` (Sinkhorn, Hungarian, soft/hard top-n) with the block learner;
- objectives and reconstruction: :mod:`~permsparse.optimizer.objectives`, :mod:`~permsparse.optimizer.sparsegpt` on
  :mod:`~permsparse.optimizer.hessian` (the dampened Hessian and ``DEFAULT_DAMP``, the one default of ``--damp``);
- solving at scale: :mod:`~permsparse.optimizer.solve`, :mod:`~permsparse.optimizer.executors` (local pool / Ray),
  :mod:`~permsparse.optimizer.checkpoint` (resumable units).
"""
