"""TEMPORARY re-export while helpers migrate: moved to permsparse.data.metrics. Removed before landing."""
from permsparse.data.metrics import *
from permsparse.data.metrics import evaluate_drift
