"""jdelta: JAX-native distillation of vision-language models (DeltaPrompts, VA-OPD, ViCuR)."""

__version__ = "0.1.0"
