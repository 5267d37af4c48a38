"""FastAPI service that scores images with exported detector artifacts.

Not built yet: this package is filled in by the api issue (#5). It depends only on ``oodforge``.
"""
