"""The `training:` section of the `ppo` stage: `PPOConfig`, tunelab's own, with TRL 1.12's field names.

TRL 1.12's `trl.experimental.ppo.PPOConfig` was the last TRL PPO config (TRL 1.13 removed PPO). This
dataclass keeps every one of its fields, names and defaults, so recipes written for it validate and mean
the same; tests/test_ppo_parity.py checks the list against the one recorded from TRL 1.12
(tests/data/ppo_reference/trl-1.12.json). It differs from TRL's in three defaults, each because TRL's
value was never acted on by TRL's PPO loop:

- `gradient_checkpointing`: transformers' default (off) instead of True, which TRL's loop ignored;
  tunelab's trainer honours it when set;
- `max_grad_norm`: 0 (no clipping), as TRL's loop never clipped; a positive value clips;
- `num_sample_generations`: 0 instead of 10 (TRL printed tables of sample completions, which
  tunelab's trainer does not; the ppo stage refuses a positive value at validate).

The fields the trainer computes (`world_size`, `batch_size`, `local_batch_size`, `mini_batch_size`,
`local_mini_batch_size`, `micro_batch_size`, `num_total_batches`) are filled when the trainer is built,
as TRL filled them; the ppo stage refuses them in a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments


@dataclass
class PPOConfig(TrainingArguments):
    """Training arguments of tunelab's `PPOTrainer` (`tunelab.training.ppo`): TrainingArguments plus PPO's own."""

    # TrainingArguments fields whose defaults PPO changes (TRL 1.12's values, but see the module doc).
    learning_rate: float = field(default=3e-6, metadata={"help": "The initial learning rate for AdamW."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N updates (a ratio below 1)."})
    bf16: bool | None = field(default=None, metadata={"help": "bfloat16 mixed precision; default: True unless fp16."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Clip gradients to this norm (0: no clipping)."})

    # Rollouts.
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Unused by PPO (kept for TRL's name)."})
    total_episodes: int | None = field(
        default=None, metadata={"help": "Prompts to answer in all (default: num_train_epochs x the prompts)."}
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rows per generation / no-grad forward chunk on each process."}
    )
    response_length: int = field(default=53, metadata={"help": "Tokens generated per response (at most)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    stop_token: Literal["eos"] | None = field(
        default=None, metadata={"help": "'eos': responses end at the tokenizer's EOS (exclusive with stop_token_id)."}
    )
    stop_token_id: int | None = field(default=None, metadata={"help": "Token id that ends a response."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a response without EOS."}
    )
    num_sample_generations: int = field(default=0, metadata={"help": "Not supported by tunelab's PPO: keep 0."})

    # PPO.
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches (optimizer steps) per PPO epoch."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty in the reward."})
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1", metadata={"help": "'k1': log-ratio; 'k3': (r - 1) - log r, lower variance (Schulman)."}
    )
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})

    # TRL's fields that name what tunelab's ppo stage names elsewhere, or that TRL computed.
    sft_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Unused: the stage's `model:`."})
    reward_model_path: str = field(
        default="EleutherAI/pythia-160m", metadata={"help": "Unused: the stage's `reward_model:`."}
    )
    model_adapter_name: str | None = field(default=None, metadata={"help": "Not supported: one adapter, `lora:`."})
    ref_adapter_name: str | None = field(default=None, metadata={"help": "Not supported: one adapter, `lora:`."})
    ds3_gather_for_generation: bool = field(default=True, metadata={"help": "DeepSpeed ZeRO-3 only (not supported)."})
    world_size: int | None = field(default=None, metadata={"help": "Computed: the number of processes."})
    num_total_batches: int | None = field(default=None, metadata={"help": "Computed: updates in the run."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "Computed: per_device x world_size."})
    local_batch_size: int | None = field(default=None, metadata={"help": "Computed: rollout rows per process."})
    batch_size: int | None = field(default=None, metadata={"help": "Computed: rollout rows per update."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "Computed: mini-batch per process."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Computed: mini-batch over all processes."})

    def __post_init__(self) -> None:
        self.bf16 = not self.fp16 if self.bf16 is None else self.bf16
        super().__post_init__()
