"""The Gradio page: inputs on the left, both answers and the kept-token overlay on the right."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from .comparison import Comparer, demo_methods
from .loading import DEFAULT_QUESTION, load_model, load_samples, model_name

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
EMPTY_ANSWER = "(no text: the model generated only special tokens)"
ERROR_TITLE = "Could not run this comparison"
ERROR_SECONDS = 20
LOG = logging.getLogger("vtoken.demo")


def build_demo(model: Any = None, processor: Any = None, model_path: str | Path | None = None, *,
               samples: str | Path | list[tuple[str, str]] | None = None, max_new_tokens: int = 32,
               prompt_template: str | None = None, comparer: Comparer | None = None,
               concurrency_limit: int = 4) -> Any:
    """The demo page as a ``gradio.Blocks`` (launch it with ``vtoken.demo.launch(demo)`` or ``.launch()``).

    Give a loaded ``model`` and ``processor``, or a ``model_path`` (an id or directory), or nothing for the
    embedded scenes model. ``samples``: a folder of sample images with questions (default
    ``assets/samples``) or ``(image path, question)`` pairs. The prompt format is checked here: a model
    whose prompt cannot be built raises ``PromptError`` before any page exists. The handler is also the
    ``/compare`` API endpoint; an invalid request raises ``gradio.Error`` with vtoken's message (shown
    in the page, and raised by gradio_client as ``AppError``). ``demo.comparer`` is the Comparer.
    """
    import gradio as gr

    if comparer is None:
        if model is None:
            model, processor = load_model(model_path)
        elif processor is None:
            raise ValueError("build_demo(model=...) needs its processor too")
        comparer = Comparer(model, processor, max_new_tokens=max_new_tokens, prompt_template=prompt_template)
    examples = samples if isinstance(samples, list) else load_samples(samples)
    methods = demo_methods()
    per_image = comparer.tokens_per_image()
    default_keep = max(1, per_image // 9) if per_image else 64
    name = model_name(comparer.model)
    budget_info = ("tokens per image to keep" + (f" (this model has {per_image}; a merge makes that many)"
                                                   if per_image else "")
                   + ", or a fraction of them such as 0.25")

    def run(image, question, method, keep, site, new_tokens):
        # preprocess=False: the image arrives as the uploaded file's record, read (and judged) by vtoken
        try:
            result = comparer.compare(image, question, method, keep, site=site or None,
                                      max_new_tokens=new_tokens)
        except (ValueError, TypeError) as error:  # the request's fault: vtoken's message, no traceback
            raise gr.Error(_escape(f"{ERROR_TITLE}: {error}"), duration=ERROR_SECONDS,
                           print_exception=False) from None
        except Exception as error:  # the next request still starts from an unwrapped model
            LOG.exception("comparison failed")
            raise gr.Error(_escape(f"{ERROR_TITLE}: {type(error).__name__}: {error}"),
                           duration=ERROR_SECONDS, print_exception=False) from None
        base, pruned, tokens = result["baseline"], result["pruned"], result["visual_tokens"]
        base_info = (f"**{base['latency_ms']:.0f} ms** to generate {base['new_tokens']} tokens  \n"
                     f"visual tokens: **{tokens['in']}**")
        speedup = base["latency_ms"] / pruned["latency_ms"] if pruned["latency_ms"] else float("nan")
        pruned_info = (f"**{pruned['latency_ms']:.0f} ms** to generate {pruned['new_tokens']} tokens "
                       f"({speedup:.2f}x)  \nvisual tokens: **{tokens['kept']}** of {tokens['in']} "
                       f"at {result['site']}  \nvtoken's own work: {pruned['vtoken_overhead_ms']:.1f} ms")
        details = {k: v for k, v in result.items() if k not in ("overlay", "patch_tokens")}
        legend = result["legend"] + (f"  \n_{result['note']}_" if result["note"] else "")
        return (base["answer"] or EMPTY_ANSWER, base_info, pruned["answer"] or EMPTY_ANSWER, pruned_info,
                result["overlay"], legend, details)

    def clear():  # a new request never shows the last one's answers next to its own error
        return "", "", "", "", None, "", None

    with gr.Blocks(title="vtoken demo", analytics_enabled=False) as demo:
        gr.Markdown(
            "# vtoken: fewer visual tokens, same model\n"
            f"One question about one image, answered by **{_escape(name)}** twice: with every visual token, "
            "and with a training-free token pruning or merging method. The overlay shows which image "
            "patches the language model still sees."
        )
        with gr.Row():
            with gr.Column(scale=5):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=320,
                                 elem_id="vtoken-image")
                question = gr.Textbox(label="Question", value=examples[0][1] if examples else DEFAULT_QUESTION,
                                      lines=2, elem_id="vtoken-question")
                with gr.Row():
                    method = gr.Dropdown(methods, value="dart" if "dart" in methods else methods[0],
                                         label="Method", allow_custom_value=True, elem_id="vtoken-method",
                                         info="or a pipeline such as cls_attn+kcenter")
                    keep = gr.Textbox(value=str(default_keep), label="Budget", info=budget_info, max_lines=1,
                                      elem_id="vtoken-keep")
                with gr.Accordion("Advanced", open=False):
                    site = gr.Textbox(label="Site", placeholder="the method's default", max_lines=1,
                                      info="where the method runs: projector, llm(K) or vision(L)")
                    new_tokens = gr.Slider(1, 256, value=max_new_tokens, step=1, label="Max new tokens")
                button = gr.Button("Compare", variant="primary", elem_id="vtoken-run")
                if examples:
                    gr.Examples(examples=[list(e) for e in examples], inputs=[image, question],
                                label="Sample scenes")
            with gr.Column(scale=7):
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("### Unpruned")
                        base_answer = gr.Textbox(label="Answer", interactive=False, lines=3,
                                                 elem_id="vtoken-baseline-answer")
                        base_info = gr.Markdown(elem_id="vtoken-baseline-info")
                    with gr.Column():
                        gr.Markdown("### With vtoken")
                        pruned_answer = gr.Textbox(label="Answer", interactive=False, lines=3,
                                                   elem_id="vtoken-pruned-answer")
                        pruned_info = gr.Markdown(elem_id="vtoken-pruned-info")
                overlay = gr.Image(label="Kept tokens", type="pil", interactive=False, height=380,
                                   elem_id="vtoken-overlay", format="png")
                legend = gr.Markdown(elem_id="vtoken-legend")
                with gr.Accordion("Details", open=False):
                    details = gr.JSON(label="Result", elem_id="vtoken-details")
        outputs = [base_answer, base_info, pruned_answer, pruned_info, overlay, legend, details]
        inputs = [image, question, method, keep, site, new_tokens]
        for trigger, api_name in ((button.click, "compare"), (question.submit, False)):
            trigger(clear, None, outputs, queue=False, api_name=False, show_progress="hidden").then(
                run, inputs=inputs, outputs=outputs, api_name=api_name, preprocess=False,
                concurrency_limit=concurrency_limit)
    demo.comparer = comparer
    return demo


def _escape(text: str) -> str:
    return html.escape(text, quote=False)


def launch(demo: Any, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT, share: bool = False,
           **kwargs: Any) -> Any:
    """Launch the page (on 127.0.0.1 unless told otherwise; no public share link unless ``share``).
    Errors are shown in the page (``show_error``)."""
    kwargs.setdefault("show_error", True)
    return demo.launch(server_name=host, server_port=port, share=share, **kwargs)
