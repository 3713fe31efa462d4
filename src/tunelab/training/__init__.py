"""Trainer plumbing the training stages share: arguments, the train-and-save loop, safeguards (signals,
atomic checkpoints, divergence), throughput and MFU, several processes, and tunelab's PPO trainer."""
