"""LoRA fine-tuning pipeline steps for MLflow Projects.

One module per `MLproject` entry point; each is a thin CLI (`main(argv)`) over a typed
`run(args: Args) -> Result`. Shared pieces: `cli` (arguments and errors), `artifacts` (artifact
names and URIs), `e2e` (the task's data format and prompt), `serving` (the reference-only model).
"""
