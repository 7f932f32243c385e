"""Console scripts: usi-train (= train.py), usi-demo, usi-ablate, usi-cache-teacher, ... Each module
imports only the standard library and usi_composer's light modules at import time, so that ``--help``
answers at once; the rest is imported inside ``main`` after the arguments are parsed."""
