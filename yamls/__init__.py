"""The recipe's yamls, shipped as package data: ``usi.yaml``, the demo's yamls and ``sweeps/``
(found by ``usi_composer.config.find_yaml``)."""
