"""EBSD (Kikuchi patterns in the SEM) behind the modality contract (models/modality.py).

``modality.EBSD`` is what the runtime loads; the rest of the package is its physics:
detector geometry, preprocessing, master patterns, simulator and files, dictionary and
template matcher, network, Gauss-Newton refiner, PC fit, the per-page indexer, training.
Nothing heavy is imported here.
"""
