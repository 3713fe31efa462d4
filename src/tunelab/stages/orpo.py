"""Odds-ratio preference optimisation with TRL's `ORPOTrainer` (`trl.experimental.orpo`): SFT and
preference learning in one loss, without a reference model (Hong et al. 2024).

Data are preference pairs (`prompt`, `chosen`, `rejected`), as the reward and dpo stages read them.
`training` is `ORPOConfig`: `beta` weighs the odds-ratio term against the chosen answers' likelihood.
ORPO can start from a base model (it learns the answers' format as it learns the preference), or from SFT.
"""

from __future__ import annotations

from typing import Any

from tunelab.stages import TRAINING, Context, Metrics, StageSpec
from tunelab.stages.base import PREFERENCE_PROGRESS, PreferenceStage, Settings, import_name, sections
from tunelab.training.tokenized import row_trainer_tokens


class ORPO(PreferenceStage):
    config_class = "trl.experimental.orpo:ORPOConfig"
    trainer_class = "trl.experimental.orpo:ORPOTrainer"
    metrics = Metrics(
        summary=(*TRAINING, "eval_rewards/accuracies"),
        progress={**PREFERENCE_PROGRESS, "log_odds_ratio": "log_odds", "nll_loss": "nll"},
    )
    eval_keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_log_odds_ratio")
    sections = sections(
        {
            "model": "policy to train: a base or SFT model (adapter folders are merged first)",
            "data": "preference pairs: prompt, chosen, rejected (datasets.load_dataset arguments)",
            "eval_data": "held-out pairs (default split: test); eval reward accuracy is reported",
            "training": "trl.experimental.orpo.ORPOConfig fields (beta, learning_rate, max_steps, max_length, ...)",
        }
    )

    def tokens(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, shown: int):
        """Pairs as ORPOTrainer tokenizes them, by its own tokenize_row."""
        return row_trainer_tokens(train, tokenizer, s.args, shown, import_name(self.trainer_class))
