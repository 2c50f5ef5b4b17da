"""The `finetune` step's work, by concern.

  * `plan`: `Plan`, everything validated and staged before training (JSON, for the torchrun ranks);
  * `resume`: which logged checkpoint `resume_from` continues from, rebuilt as a Trainer checkpoint;
  * `session`: the model, the Trainer and its MLflow run (`build`, `train`);
  * `launch`: `num_processes > 1`: the same `train` on every rank under torchrun;
  * `trainer_utils`: the pieces that plug into `transformers.Trainer` (answer-only loss, callbacks).
"""

ENTRY_POINT = "finetune"  # the MLproject entry point that trains: the step tag of its runs
