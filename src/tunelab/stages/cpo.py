"""Contrastive preference optimisation with TRL's `CPOTrainer` (`trl.experimental.cpo`), reference-free,
and SimPO as its `loss_type: simpo` (Meng et al. 2024: length-normalised log-likelihoods and a margin
`simpo_gamma`; `cpo_alpha: 0` drops CPO's likelihood term, for SimPO as published).

Data are preference pairs (`prompt`, `chosen`, `rejected`). `training` is `CPOConfig` (`loss_type`:
sigmoid, hinge, ipo, simpo, alphapo; `beta`, `cpo_alpha`, `simpo_gamma`, ...).
"""

from __future__ import annotations

from typing import Any

from tunelab.stages import TRAINING, Context, Metrics, StageSpec
from tunelab.stages.base import PREFERENCE_PROGRESS, PreferenceStage, Settings, import_name, sections
from tunelab.training.tokenized import row_trainer_tokens


class CPO(PreferenceStage):
    config_class = "trl.experimental.cpo:CPOConfig"
    trainer_class = "trl.experimental.cpo:CPOTrainer"
    metrics = Metrics(
        summary=(*TRAINING, "eval_rewards/accuracies"), progress={**PREFERENCE_PROGRESS, "nll_loss": "nll"}
    )
    eval_keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
    sections = sections(
        {
            "model": "policy to train: usually ${sft} (adapter folders are merged first)",
            "data": "preference pairs: prompt, chosen, rejected (datasets.load_dataset arguments)",
            "eval_data": "held-out pairs (default split: test); eval reward accuracy is reported",
            "training": "trl.experimental.cpo.CPOConfig fields (loss_type: sigmoid or simpo, beta, cpo_alpha, "
            "simpo_gamma, ...)",
        }
    )

    def tokens(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, shown: int):
        """Pairs as CPOTrainer tokenizes them, by its own tokenize_row."""
        return row_trainer_tokens(train, tokenizer, s.args, shown, import_name(self.trainer_class))
