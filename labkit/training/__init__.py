"""Trainers of the shapes model and its variants: ``labkit train WHAT``.

One module per job, each a `Trainer` (its help, its arguments, the function that runs it) in `TRAINERS`;
`labkit.training.jobs` is what they share (the job runner, the config base, checkpoints, the loop):

- ``shapes`` (`labkit.training.shapes`): the shapes model, its VAE then its UNet;
- ``classifier`` (`labkit.training.classifier`): the classifier behind `labkit.quality`;
- ``vae`` (`labkit.training.vae`): the VAE with its decoder tuned for MSE (``variants/vae``);
- ``student`` (`labkit.training.student`): a BK-SDM-style distilled UNet (``variants/student``);
- ``qat`` (`labkit.training.qat`): quantization-aware training of the linear layers (``variants/qat``);
- ``vpred`` (`labkit.training.vpred`): the v-prediction variant, trained and shipped (``variants/vpred``).

`labkit.training.samples` draws the sample page of a trained model. Every job resumes from its
checkpoints when run again with the same ``--out``; ``labkit train WHAT --help`` lists its options.
"""

from __future__ import annotations

from labkit.training import classifier, qat, shapes, student, vae, vpred
from labkit.training.jobs import Trainer

TRAINERS: dict[str, Trainer] = {
    "shapes": shapes.TRAINER,
    "classifier": classifier.TRAINER,
    "vae": vae.TRAINER,
    "student": student.TRAINER,
    "qat": qat.TRAINER,
    "vpred": vpred.TRAINER,
}
"""The jobs of ``labkit train``, by name."""

__all__ = ["TRAINERS", "Trainer"]
