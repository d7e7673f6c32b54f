"""Files to tensors: image sources (folders, saved and hub data sets), decoding and augmentation,
captions, the latent store and the resumable read order.

Rule: reads the user's data and turns it into tensors; writes only the latent store, through
modules/durable.py. Knows nothing of the training loop or of models beyond the VAE it is handed.
"""
