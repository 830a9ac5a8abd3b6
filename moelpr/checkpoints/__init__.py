"""What reads and writes checkpoint weights: streamed safetensors shards, staged output directories."""
