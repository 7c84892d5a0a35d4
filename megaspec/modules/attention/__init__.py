"""Attention kinds: self-attention, cross-attention and the core (softmax) attention they share."""
