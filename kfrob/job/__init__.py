"""The training job: Fashion-MNIST workloads and a byte-level transformer, YAML configs,
``kfrob train`` and ``kfrob compare`` (see :mod:`kfrob.job.cli`).

This subpackage is an application of the optimizer, not part of it: ``import kfrob`` never
imports it, and its extra dependencies (PyYAML, pydantic, tqdm, TensorBoard, matplotlib)
come with ``pip install 'kfrob[train]'``. :mod:`kfrob.job.workloads` needs only torch.
"""
