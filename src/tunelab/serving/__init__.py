"""`tunelab serve`: an OpenAI-compatible server for any model, adapter or run tunelab can name.

- `sources`: what MODEL and `--adapter NAME=PATH` serve (one base, adapters by name), checked from files;
- `engine`: the batching decoding loop (transformers), one thread over the model;
- `vllm_backend`: the same interface over vLLM (CUDA);
- `protocol`: OpenAI's request checks, prompts through the chat template, response and chunk bodies;
- `server`: the HTTP handler (stdlib, one thread per connection), `service`: start, close, SIGTERM.

This package is `tunelab.serving`, not `tunelab.serve`: `tunelab.serve(...)` is the Python API function.
"""
