"""Outlier synthesis with Stable Diffusion: the generator, the kNN boundary sampler, the ID-near filter.

``python -m synth fit-generator`` fits the embedded generator (or textual inversion of a real SD
checkpoint); ``python -m synth generate`` writes an outlier dataset (``oodforge.outliers``). Depends
only on ``oodforge``; the trainer reads what it writes from disk.
"""
