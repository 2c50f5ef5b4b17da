"""Build-time renderers (MLproject, conda.yaml): outside the runtime package, so editing them is no
pipeline code change for the step cache."""
