"""Serving vtoken's pruning inside an inference server.

``vllm_plugin`` is the entry point vLLM loads (group ``vllm.general_plugins``); ``plan`` turns the model
config's ``vtoken`` entry into a pipeline and the per-image placeholder count. Nothing here imports vLLM
at import time: ``import vtoken`` works without it, and the vLLM classes load only when vLLM asks for them.
"""
