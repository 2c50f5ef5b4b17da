"""The pipeline's entry points for MLflow Projects, one module per `MLproject` entry point, and nothing else.

Each is a thin CLI (`main(argv)`) over a typed `run(args: Args) -> Result`; the work lives in the core
package `lora_pipeline/`. No step imports another (tests/unit/test_layout.py).
"""
