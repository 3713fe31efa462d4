"""Loss on assistant turns only, for image+text chats: the mask, carried onto the processor's tokens.

TRL 1.16 masks vision chats only through `{% generation %}` markers in the template (1.12 refused
`assistant_only_loss` for them), and otherwise trains on every non-pad token (system, user and image
tokens too). `collator` keeps TRL's collator and derives the mask as
`tunelab.models.chat_templates.assistant_mask` does for text chats (render up to and through each
assistant turn, mark the characters the assistant adds), then carries it onto the processor's ids, where
each image placeholder has grown into the image's tokens.
"""

from __future__ import annotations

import difflib
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.models.chat_templates import assistant_mask


class ProcessorRenderer:
    """The processor's chat template with its tokenizer's encoding: what `chat_templates.assistant_mask` needs."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    @property
    def chat_template(self) -> str | None:
        return self.processor.chat_template

    def apply_chat_template(self, turns: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.processor.apply_chat_template(turns, **kwargs)

    def __call__(self, text: str, **kwargs: Any):
        return self.processor.tokenizer(text, **kwargs)


def text_turns(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turns with image payloads dropped (placeholders kept): what the template renders."""
    out = []
    for turn in turns:
        content = turn.get("content")
        if isinstance(content, list):
            content = [{k: v for k, v in part.items() if k != "image"} for part in content]
        out.append({**turn, "content": content})
    return out


def carry_mask(plain_ids: list[int], plain_mask: list[int], ids: list[int]) -> list[int]:
    """The mask of `plain_ids` (placeholders unexpanded) carried onto `ids` (each placeholder grown into
    its image's tokens): matched tokens keep their mask, tokens the processor added get 0."""
    out = [0] * len(ids)
    matcher = difflib.SequenceMatcher(None, plain_ids, ids, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            out[block.b + k] = plain_mask[block.a + k]
    return out


def collator(processor: Any, args: Any, assistant_only: bool, where: str):
    """TRL's vision collator; with `assistant_only`, labels only on the assistants' tokens."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    class AssistantOnlyCollator(DataCollatorForVisionLanguageModeling):
        """TRL's batches (images processed, right padding), labels masked to the assistant turns."""

        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            from trl.data_utils import prepare_multimodal_messages

            turns = [prepare_multimodal_messages(e["messages"], images=e["images"]) for e in examples]
            batch = super().torch_call(examples)
            if not assistant_only:
                return batch
            renderer = ProcessorRenderer(self.processor)
            labels = batch["labels"]
            for i, conversation in enumerate(turns):
                plain_ids, plain_mask = assistant_mask(renderer, text_turns(conversation), where, i)
                length = int(batch["attention_mask"][i].sum())
                ids = batch["input_ids"][i, :length].tolist()
                mask = carry_mask(plain_ids, plain_mask, ids)
                truncated = self.max_length is not None and length >= self.max_length
                if not truncated and sum(mask) != sum(plain_mask):
                    raise TunelabError(
                        f"'{where}': the assistant-only mask could not be carried onto the processor's tokens "
                        f"({sum(mask)} of {sum(plain_mask)} assistant tokens found): set "
                        "training.assistant_only_loss: false"
                    )
                for j, keep in enumerate(mask):
                    if not keep:
                        labels[i, j] = -100
            batch["labels"] = labels
            return batch

    return AssistantOnlyCollator(
        processor=processor,
        max_length=args.max_length,
        pad_to_multiple_of=args.pad_to_multiple_of,
        dataset_text_field=args.dataset_text_field,
    )
