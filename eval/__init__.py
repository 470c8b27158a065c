"""Evaluation: the speed and memory bench, the offline scenes benchmark and its embedded model, and
the scenes task exported for lmms-eval (``vtoken.eval`` once installed)."""
