"""Bodies of the nox sessions. Runs inside nox's own interpreter: never import torch here."""
