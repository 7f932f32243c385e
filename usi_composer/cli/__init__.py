"""Console scripts: ``usi-train`` (= ``train.py``), ``usi-demo``, ``usi-ablate``, ``usi-cache-teacher``, ..."""
