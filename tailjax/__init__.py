"""tailjax: tail-aware normalizing-flow anomaly detection and attention-MIL in JAX/Flax."""

__version__ = "0.1.0"
