"""Dimensions of real backbones, for tests that build them at full size on the meta device or count parameters."""

# DeBERTaV3-base dimensions (microsoft/deberta-v3-base config.json)
DEBERTA_V3_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "intermediate_size": 3072, "vocab_size": 128100, "position_buckets": 256,
                   "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": -1,
                   "norm_rel_ebd": "layer_norm", "share_att_key": True}
