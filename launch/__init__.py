"""Image folders -> shards: the make_shards command, its scan, split, packing, report and the demo dataset."""
