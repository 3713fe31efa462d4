"""What the evaluation stages share: answers and exact match, log-likelihood multiple choice, image-pipeline
scoring and the lm-evaluation-harness component."""
