"""REINFORCE leave-one-out with `trl.RLOOTrainer`: sample `num_generations` answers per prompt, score them
with `rewards:`, and take each answer's advantage against the mean of the others (Ahmadian et al. 2024).
No value model and no critic; the KL to the reference is a reward penalty (`beta`, default 0.05).

`rewards`, `reference_column`, `lora`, `quantization` and the chat settings are grpo's: `module:function`
callables (`tunelab.rewards:exact_match`, ...) and/or reward models (`${reward}`). `training` is
`trl.RLOOConfig`. With `use_vllm: true` (a CUDA machine with vLLM), generation runs in vLLM, colocated
with training (`vllm_mode: colocate`) or on a `trl vllm-serve` server (`vllm_mode: server`).
"""

from __future__ import annotations

from tunelab.stages.base import ONLINE_SECTIONS, OnlineStage, sections


class RLOO(OnlineStage):
    config_class = "trl:RLOOConfig"
    trainer_class = "trl:RLOOTrainer"
    sections = sections(
        {
            **ONLINE_SECTIONS,
            "training": "trl.RLOOConfig fields (num_generations, max_completion_length, beta, learning_rate, "
            "use_vllm, ...)",
            "kl_limit": "stop when the logged KL to the reference passes this value (needs training.beta > 0)",
        }
    )
