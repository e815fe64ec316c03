"""Training, evaluation and research code (not installed in the server image; needs the `train` extra for plots).

CLIs: `python -m training.train`, `python -m training.evaluate`, `python -m training.depth_study`.
"""
