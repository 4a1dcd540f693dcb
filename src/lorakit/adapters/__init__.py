"""The adapter math: LoRA layers and their config. Imports torch only; knows nothing of training,
data or serving."""
