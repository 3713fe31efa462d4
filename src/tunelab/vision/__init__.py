"""Image+text (vision-language) models: what the `vlm_build`, `vlm_sft` and `eval` stages and `tunelab chat
--image` share.

- `models`: detecting, loading and building image+text models and their processors;
- `data`: TRL's vision SFT rows, their images opened and checked;
- `collator`: loss on assistant turns only, carried onto the processor's tokens;
- `checks`: the model checked and its memory planned from its config alone;
- `prompting`: image+text eval (generation over images, answers scored).
"""
