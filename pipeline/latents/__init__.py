"""The latent folder: its manifest, random access into its shards, the resumable training loader."""
