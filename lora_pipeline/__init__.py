"""The core of the pipeline: everything the entry points in `steps/` stand on.

Sub-packages by concern (the README's tree gives one line per module):
  base/           the pinned base model: manifest, Hub resolution, GGUF conversion, local cache,
                  copying a checkpoint while hashing it (transfer)
  model/          the logged model: the pyfunc, precision, device / dtype / memory knobs
  task/           the task: prompt, output format, metrics, data loading
  training/       Trainer plug-ins, resume, multi-process launch, FSDP / DeepSpeed configs
  registry/       verified copy of a base, the promotion gate, lineage, recovery
  orchestration/  `main`'s step cache, parameter composition, summary
  tracking/       step runs, stale runs
Top level: `errors` (InputError, StepError), `cli` (Args -> argparse), `artifacts` (the contract between
steps: artifact names, tags, URIs), `paths` (where the project and this package live).

Direction: this package never imports `steps` (tests/unit/test_layout.py holds it).
"""
