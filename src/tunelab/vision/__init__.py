"""Vision-language models: building, loading, image data, masks, collator, and image+text prompting."""
