"""The adapter math and the PEFT file format: LoRA layers and their variants, their config, and
:mod:`~lorakit.adapters.peft_format`. Imports torch, safetensors and bitsandbytes only; knows
nothing of training, data or serving."""
