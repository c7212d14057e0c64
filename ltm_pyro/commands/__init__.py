"""The command-line tools, installed as console scripts (``[project.scripts]``) and kept as
``experiments/*.py`` wrappers that run from a checkout:

- ``ltm-train`` (``experiments/run_svi.py``): train or resume a run in a folder
- ``ltm-eval`` (``experiments/evaluate.py``): score a checkpoint on a split
- ``ltm-generate`` (``experiments/generate.py``): sample text from a checkpoint
- ``ltm-sweep`` (``experiments/sweep_inference_steps.py``): bounds against test-time T
"""
