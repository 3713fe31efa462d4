"""Direct preference optimisation with `trl.DPOTrainer`: the policy learns from preference pairs
directly, without a reward model or sampling.

`training` is `trl.DPOConfig` (`beta`, `loss_type`, `max_length`, ...), `lora` is
`peft.LoraConfig`, `quantization` is `BitsAndBytesConfig`. Data are the same preference pairs as
the reward stage. The reference model is the starting model: with LoRA, the base with the
adapter switched off (no second copy in memory); without, a frozen copy loaded from the same
folder. (TRL would otherwise rebuild it from `config._name_or_path`, which for a merged SFT
adapter names the pre-SFT base.)
"""

from __future__ import annotations

from typing import Any

from tunelab.stages import Context, StageSpec
from tunelab.stages.base import PreferenceStage, Settings, sections
from tunelab.training.tokenized import dpo_tokens


class DPO(PreferenceStage):
    config_class = "trl:DPOConfig"
    trainer_class = "trl:DPOTrainer"
    reference = True
    sections = sections(
        {
            "model": "policy to train: usually ${sft} (adapter folders are merged first)",
            "data": "preference pairs: prompt, chosen, rejected (datasets.load_dataset arguments)",
            "eval_data": "held-out pairs (default split: test); DPO's eval reward accuracy is reported",
            "training": "trl.DPOConfig fields (beta, loss_type, learning_rate, max_steps, max_length, ...)",
            "lora": "peft.LoraConfig fields; omit for full fine-tuning against a frozen copy",
        }
    )

    def tokens(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, shown: int):
        """Pairs as DPOTrainer tokenizes them: the prompt, then each answer (the marked tokens)."""
        return dpo_tokens(train, tokenizer, s.args, shown)
