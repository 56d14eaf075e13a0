"""Fine-tuning backbones in the benchmark protocol: LoRA adapters (through ``peft``) or full fine-tuning.

- :mod:`protlm.finetune.config`: the ``finetune:`` settings of a suite and the ``--finetune`` modes;
- :mod:`protlm.finetune.backbone`: per-residue features with gradients, which the head trainer
  (:func:`protlm.evaluate.training.train_head`) takes in place of stored embeddings;
- :mod:`protlm.finetune.lora`: adapters on protlm models, saved and loaded in PEFT's format, and merged.
"""
