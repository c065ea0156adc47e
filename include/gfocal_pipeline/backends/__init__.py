"""Inference backends. Each runs one shard of preprocessed inputs into the shared output layout."""
