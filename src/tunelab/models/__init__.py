"""Models and what surrounds them: specs (`spec`: what `model:` names, resolved), loading (`loading`,
`gguf_files`), tokenizers (`tokenizers`), adapters and quantization, merging (`merge`), chat templates,
generation, reward models and reward functions, preflight checks and the memory planner (`plan`)."""
