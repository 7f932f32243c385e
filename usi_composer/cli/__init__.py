"""Console scripts: ``usi-train`` (= ``train.py``), ``usi-demo``."""
