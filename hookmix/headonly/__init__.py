"""Head-only fine-tuning: heads, the feature cache (its format, identity and streaming), ``fit``, the
trained model, sharded extraction and the grid sweep."""
