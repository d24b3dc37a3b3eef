"""The evaluate stage: lm-evaluation-harness over the run's checkpoints, offline.

No internet: the datasets/hub libraries read these when they are first imported, so they are set before any
module of this package imports lm_eval (which imports datasets). setdefault lets an operator with a hub mirror
override them.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
