"""What writes a trained model in a format other tools serve: standard transformers MoE checkpoints."""
