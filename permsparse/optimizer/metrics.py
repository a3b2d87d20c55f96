"""TEMPORARY re-export while helpers migrate: moved to permsparse.data.metrics. Removed before landing."""
from permsparse.data.metrics import *  # noqa: F401,F403
from permsparse.data.metrics import evaluate_drift  # noqa: F401
