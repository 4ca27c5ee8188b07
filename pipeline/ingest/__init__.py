"""Ingest: LAION-style URL lists -> img2dataset on Ray -> filtered, deduplicated image shards."""
