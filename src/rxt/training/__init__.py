"""Training: one loop shared by every curriculum stage (:mod:`rxt.training.loop`) and the stages
themselves, each supplying its batches, its loss and which modules train (the paper's
training curriculum, arXiv:2510.03561)."""
