"""``vtoken bench``: prefill latency, decode speed, memory and FLOPs of pruning methods, against the
zero-overhead oracle.

For one model and a grid of methods x budgets (visual tokens kept per image), each configuration is
measured in the same run as its oracle:

- prefill: ``model(**inputs, use_cache=True, logits_to_keep=1)`` (the prefill ``generate()`` runs),
  wrapped with the method; median, min/max and quartiles of ``runs`` timed runs after ``warmup``;
- oracle: the same model fed an input that already holds only the kept visual tokens, i.e. what an
  implementation with free scoring and selection would cost. Pre-LLM pipelines: the vision encoder
  and projector on the pixels (in full, as the method runs them), then the language model and the LM
  head on the exact ``inputs_embeds`` / ``attention_mask`` / ``position_ids`` the wrapped model fed its
  language model (captured once by a forward pre-hook). ``llm(K)`` pipelines: the same, with the
  decoder pruned at layer K by a fixed stage that replays the selection the method made (no signals,
  no selection work). ``vision(L)`` pipelines: the tower with fixed stages replaying the method's
  kept tokens at each vision(L) site (blocks after L run on those tokens only; nothing is scored),
  then the language model on the captured input. Timed runs of the method and of the oracle
  alternate, so both see the same machine load;
- the unpruned model: its timed runs alternate with each method's too, and every ratio in the table
  (speed-up, oracle speed-up, total speed-up, measured / oracle) is the median of per-pair ratios; a
  configuration whose runs spread more than ``--max-spread`` (max/min) is flagged for a rerun, and the
  machine (CPU or GPU, threads, torch and transformers versions) is printed and saved with the results;
- scoring and selection time per stage (``model.vtoken.stats``), as a share of the prefill;
- decode: tokens/s of ``generate()`` after the first token, and the whole ``generate()`` time;
- peak memory (CUDA max allocated, or the process's peak RSS on CPU) and the KV-cache bytes after
  prefill, read from the cache itself;
- analytic FLOPs split into vision / projector / LLM (``vtoken.flops``; each encoder block counted at
  the tokens it sees after ``vision(L)`` pruning), and the FLOPs-ideal speed-up.

Inputs are synthetic: random pixels and random text ids around the image placeholders (the token
counts are what matters for speed). Outputs: ``results.json``, ``results.csv`` and plots in ``--out``;
a table and the command that reproduces the run are printed.

Modules, one job each: ``cli`` (the command line), ``runner`` (a run from start to results), ``measure``
(one configuration's row), ``oracle``, ``timing`` (prefill, timed runs, generate, KV-cache bytes),
``system`` (memory, device name, machine), ``report`` (files, plots, table), ``scaling`` (``--scaling``:
the sweep over visual tokens per image and batch size, its files, plot and table). Nothing here knows a model family:
the inputs, their visual counts, the FLOPs dimensions and the vision part come from the model's
integration (``vtoken.integrations.base.Integration.for_model``).
"""

from __future__ import annotations

from ..grid import MethodSpec
from .cli import add_arguments, command_line, run, split_list
from .measure import Workload, measure_baseline, measure_method, vision_layer_tokens
from .oracle import FixedKeep, llm_oracle, oracle_inputs, pre_llm_oracle, run_language_model, vision_oracle
from .report import CSV_COLUMNS, format_table, plot_results, write_results
from .runner import DEFAULT_BUDGETS, DEFAULT_METHODS, embedded_model_path, run_bench, workload
from .scaling import SCALING_COLUMNS, format_scaling, run_scaling, scaling_defaults
from .timing import cache_bytes, median_interval, paired_ratio, spread

__all__ = ["add_arguments", "run", "run_bench", "command_line", "split_list", "workload", "Workload",
           "measure_baseline", "measure_method", "oracle_inputs", "pre_llm_oracle", "llm_oracle", "vision_oracle",
           "vision_layer_tokens",
           "run_language_model", "FixedKeep", "cache_bytes", "CSV_COLUMNS", "format_table", "write_results",
           "plot_results", "embedded_model_path", "MethodSpec", "DEFAULT_METHODS", "DEFAULT_BUDGETS", "run_scaling",
           "format_scaling", "scaling_defaults", "SCALING_COLUMNS", "paired_ratio", "spread", "median_interval"]
