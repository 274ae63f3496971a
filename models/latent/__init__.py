"""Latent maps, modality-neutral: a scan-adaptive linear basis (basis.py) that turns any
modality's per-frame features into a short embedding, and the sink's clustering, boundary
and novelty maps of those embeddings (clusters.py). numpy at import; scikit-learn inside."""
