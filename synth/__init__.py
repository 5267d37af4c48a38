"""Outlier synthesis with Stable Diffusion (generator, kNN boundary sampler, FAISS filter, writer).

Not built yet: this package is filled in by the synth issue (#3). It depends only on ``oodforge``.
"""
