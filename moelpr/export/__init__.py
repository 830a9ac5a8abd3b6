"""What writes a trained model in a format other tools serve: standard transformers MoE checkpoints (one module per
output architecture behind the interface of :mod:`.format`, their shared planning and writing in
:mod:`.transformers_moe`) and GGUF files for llama.cpp (:mod:`.gguf`)."""
