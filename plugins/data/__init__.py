"""Data for training stages: formats, tokenisation with loss masks, packing, token shards."""
