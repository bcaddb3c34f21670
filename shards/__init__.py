"""The data format and where shards live: sample schema, index, manifest, writer, reader, store, node cache."""
