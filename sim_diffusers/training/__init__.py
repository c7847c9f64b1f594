"""Training support for train_sim_pixart.py: captions, text embeddings, networks, the SIM step, checkpoints, Hub."""
