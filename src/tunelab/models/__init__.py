"""Models and what surrounds them: specs and loading (hub id, folder, adapter, GGUF), adapters and
quantization, chat templates, generation, reward functions, preflight checks and the memory planner."""
