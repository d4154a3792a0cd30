"""Training for the two default models: the GNCNN CIFAR-10 classifier and the IN denoiser.

Each run writes into its own folder:

* `checkpoint.pt`: model, optimizer, LR schedule and progress after every epoch (our own file,
  loaded with `weights_only=True`); `resume=True` continues from it.
* `metrics.jsonl`: one JSON object per epoch (train loss, eval metric, LR, seconds).
* `curve.png`: training curves (matplotlib, Agg backend).
* `weights.safetensors` + `config.json`: the final weights, marked trained, with the training
  command/config, epochs, wall time, hardware and final metrics in the metadata, and the model
  spec that rebuilds them (the same format as `models/configs/*.json`).

The classifier can learn from trained runs as well as from the labels (`teachers`: knowledge
distillation from the mean of their logits; the teachers' weight hashes are recorded). Either
model can end as the mean of its weights over the last epochs (`average_from`: stochastic weight
averaging; the per-epoch metrics then score the average and, as `iterate_*`, the last weights).

Randomness is derived from (seed, epoch), so a resumed run draws the same batches as an
uninterrupted one.

Modules, each importing only those above it in this list:

* `config`: the settings dataclasses and the served model config that runs start from.
* `optim`: optimizers and learning-rate schedules by name.
* `run_folder`: the run folder's files (checkpoint and resume, metrics, result weights).
* `plots`: `curve.png`.
* `loop`: the epoch loop both models share (`fit`) and what it is given per model.
* `distill`: the teacher ensemble and the distillation loss.
* `classifier`, `denoiser`: each model's data, loss, metrics and evaluation; `train_classifier`,
  `train_denoiser`.

`normserve.models.train` is the entry point (`normserve train classifier|denoiser`).
"""
