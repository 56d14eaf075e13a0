"""Ankh3 pretraining objectives: pure, seeded functions from residue ids to (encoder input, target, task).

- :func:`denoise` (``[NLU]``): 1-gram masking with one sentinel per residue, optionally merged runs or T5 spans;
- :func:`complete` (``[S2S]``): the encoder reads the first part, the decoder writes the rest;
- :class:`TaskMixer`: draws the masking rate per step and the task per sequence, per :class:`ObjectiveConfig`;
- :func:`collate`: pads examples into model inputs with -100 label padding;
- :class:`PretrainBatches`: stream -> mixer -> collate micro-batches with an exact, resumable position.
"""

from protlm.objectives.batches import PretrainBatches, example_generator, fixed_examples
from protlm.objectives.complete import complete
from protlm.objectives.config import TASK_IDS, TASKS, ObjectiveConfig
from protlm.objectives.denoise import denoise, denoise_with_mask, noise_mask, sentinels_needed
from protlm.objectives.example import IGNORE_INDEX, Example, collate
from protlm.objectives.mixer import StepParams, TaskMixer, step_generator

__all__ = [
    "IGNORE_INDEX", "TASKS", "TASK_IDS", "Example", "ObjectiveConfig", "PretrainBatches", "StepParams", "TaskMixer",
    "collate", "complete", "example_generator", "fixed_examples", "denoise", "denoise_with_mask", "noise_mask", "sentinels_needed", "step_generator",
]
