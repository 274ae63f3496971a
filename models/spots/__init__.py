"""TEM / 4D-STEM / precession spot patterns behind the modality contract (modality.py)."""
