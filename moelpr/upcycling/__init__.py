"""What turns a dense checkpoint into the one a stage trains: MoE-LPR / MoE-CT upcycling, the per-layer expert
allocation it can use, and LLaMA-Pro block expansion (the comparison's baseline)."""
