"""Group relative policy optimisation with `trl.GRPOTrainer`: sample a group of answers per
prompt, score them with reward functions, and push the policy toward the better ones. No value
model, and rewards can be plain Python.

`rewards` lists the reward functions: `module:function` callables in TRL's form (tunelab ships
`tunelab.rewards:exact_match`, `:numeric` and `:close`), and/or reward models (`${reward}`, a
folder or hub id of a classifier with num_labels=1; scored on prompt + answer + EOS, as the reward
stage trained it). TRL sums them, weighted by `training.reward_weights`. Each callable is imported
and called on the first rows of the data during `tunelab validate`, so one that cannot be
imported or raises fails before training.

`training` is `trl.GRPOConfig`; `lora` and `quantization` as in sft. The reference answers reach
reward functions as `reference`: `reference_column` names the column (default: `reference`, else
`completion`; TRL itself withholds a column named `completion`).
"""

from __future__ import annotations

from tunelab.stages.base import ONLINE_SECTIONS, OnlineStage, sections


class GRPO(OnlineStage):
    config_class = "trl:GRPOConfig"
    trainer_class = "trl:GRPOTrainer"
    sections = sections(
        {
            **ONLINE_SECTIONS,
            "training": "trl.GRPOConfig fields (num_generations, max_completion_length, beta, learning_rate, ...)",
            "lora": "peft.LoraConfig fields; omit for full fine-tuning",
            "quantization": "transformers.BitsAndBytesConfig fields: GRPO with QLoRA",
            "kl_limit": "stop when the logged KL to the reference passes this value (needs training.beta > 0)",
        }
    )
