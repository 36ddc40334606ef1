"""Projectors: map encoder tokens into the decoder's embedding space."""
