"""fxmerge: make any CNN shallower with exact, latency-aware conv merging (LayerMerge on torch.fx)."""
