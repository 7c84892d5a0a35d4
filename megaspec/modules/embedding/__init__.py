"""Embedding kind: token ids or image patches -> hidden states."""
