"""tinyvlm as an lmms-eval model: ``lmms-eval --model tinyvlm --model_args pretrained=NAME --tasks ...``.

lmms-eval 0.7 finds models outside its own tree through the ``lmms_eval.models`` entry-point group
(``models/registry_v2.py``), which tinyvlm's ``pyproject.toml`` fills with `manifests`: installing tinyvlm
and lmms-eval (``pip install "tinyvlm[eval]"``) is all it takes. This module imports lmms-eval, so only
lmms-eval imports it.

`TinyVLMModel` is a *simple* model (lmms-eval's ``doc_to_visual`` + ``doc_to_text`` interface): a request's
context becomes one user turn with the request's images before it, formatted as tinyvlm formats training
conversations, exactly as ``tinyvlm eval`` prompts (so both give the same answers). It implements
``generate_until`` (batched, in the requests' order), ``loglikelihood`` (the continuation's mean loss after
the prompt's generation prompt, as lmms-eval's evaluator expects, and whether greedy decoding would produce
it) and
``generate_until_multi_round``.

``--model_args``: ``pretrained`` (what ``tinyvlm generate --model`` takes), ``dtype`` (``float32``,
``bfloat16``, ...), ``max_new_tokens`` (when a task sets none; default 1024, lmms-eval's usual model
default); ``--device`` and ``--batch_size`` (a number; ``auto`` is not supported) come from lmms-eval's own
flags.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Sequence

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from tinyvlm.api import build_vlm, load_vlm
from tinyvlm.devices import check_device, default_device
from tinyvlm.errors import ConfigError, DataError
from tinyvlm.evaluation.tasks import DEFAULT_MAX_NEW_TOKENS
from tinyvlm.sources import resolve

MODEL_ID = "tinyvlm"
#: ``generation_kwargs`` keys this model reads; any other is refused rather than ignored.
GENERATION_KEYS = {"until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams",
                   "repetition_penalty"}


def manifests() -> list[Any]:
    """The entry point's payload: one simple model, ``tinyvlm``. (``lmms_eval.models`` is imported here, not
    at the top: importing it loads the entry points, which import this module.)"""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TinyVLMModel")]


class TinyVLMModel(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it for batch_size=auto, which is refused
        dtype: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(
                f"--model_args: unknown argument(s) {', '.join(sorted(unknown))} for tinyvlm; it takes pretrained, "
                "dtype and max_new_tokens (and lmms-eval's --device / --batch_size)"
            )
        try:
            self.batch_size = int(batch_size)  # a string from lmms-eval's CLI
        except ValueError:
            raise ConfigError(f"--batch_size {batch_size!r}: tinyvlm takes a number of requests per batch") from None
        if self.batch_size < 1 or int(max_new_tokens) < 1:
            raise ConfigError("batch_size and max_new_tokens must be at least 1")
        self.max_new_tokens = int(max_new_tokens)
        source = resolve(str(pretrained), "vlm")  # once: trained files are loaded, a recipe built
        options: dict[str, Any] = dict(dtype=dtype, device=check_device(device) or default_device())
        self.vlm = load_vlm(source, **options) if source.has_files else build_vlm(source, **options)

    @property
    def device(self) -> torch.device:
        return self.vlm.device

    # ------------------------------------------------------------------------------------------ requests

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _images(visuals: Any) -> list[Any]:
        """A request's visuals (None or a list, possibly nested one level) as a flat list of PIL images."""
        flat: list[Any] = []
        for visual in visuals or []:
            flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
        if any(not hasattr(visual, "convert") for visual in flat):
            raise DataError("tinyvlm answers about images only (this task gives videos or audio)")
        return [visual.convert("RGB") for visual in flat]

    @staticmethod
    def _turn(context: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": context}]

    def _generate(self, contexts: Sequence[str], images: Sequence[list[Any]], gen_kwargs: dict[str, Any]) -> list[str]:
        """Answers to a batch that shares ``gen_kwargs``, each ending before its first ``until`` string.
        Greedy unless ``do_sample`` (then ``temperature``, default 1, ``top_k``, ``top_p``), as transformers'
        ``generate`` reads these keys in lmms-eval's models."""
        unknown = set(gen_kwargs) - GENERATION_KEYS
        if unknown:
            raise ConfigError(f"generation_kwargs {', '.join(sorted(unknown))} are not supported by tinyvlm")
        if int(gen_kwargs.get("num_beams", 1)) != 1:
            raise ConfigError("tinyvlm decodes greedily or by sampling: num_beams must be 1")
        sampling = bool(gen_kwargs.get("do_sample", False))
        until = gen_kwargs.get("until") or []
        return self.vlm.generate(
            [self._turn(context) for context in contexts], images=list(images),
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            temperature=float(gen_kwargs.get("temperature", 1.0)) if sampling else 0.0,
            top_k=gen_kwargs.get("top_k") if sampling else None,
            top_p=gen_kwargs.get("top_p") if sampling else None,
            repetition_penalty=gen_kwargs.get("repetition_penalty"),
            stop=[stop for stop in ([until] if isinstance(until, str) else until) if stop],
        )

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batches of up to ``batch_size`` consecutive requests with equal generation settings, in order."""
        answers: list[str] = []
        for _, group in itertools.groupby(requests, key=lambda r: json.dumps(r.args[1], sort_keys=True, default=str)):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                batch = [request.args for request in group[start : start + self.batch_size]]
                contexts = [args[0] for args in batch]
                images = [self._images(doc_to_visual(self._doc(task, split, doc_id)))
                          for _, _, doc_to_visual, doc_id, task, split in batch]
                answers += self._generate(contexts, images, dict(batch[0][1]))
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each request's rounds, one after another: the first from its context and visuals, each later one
        from ``doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)``, which returns
        ``(visuals, context, terminal, outputs so far, round info)``; the answer is the list of outputs."""
        results = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            visuals, outputs, info = doc_to_visual(doc), [], None
            for round_index in itertools.count():
                if round_index:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=outputs, round_idx=round_index, previous_round_info=info
                    )
                    if terminal:
                        break
                outputs = [*outputs, *self._generate([context], [self._images(visuals)], dict(gen_kwargs))]
            results.append(list(outputs))
        return results

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(loss, greedy)`` per request: the mean cross-entropy of the continuation's tokens after the prompt
        (the user turn and its generation prompt, where the answer starts; the continuation tokenised on its
        own), and whether greedy decoding would produce exactly those tokens.

        The loss, not the log-probability the base class's docstring names: lmms-eval 0.7.3 ranks
        multiple-choice options with ``argmin`` (``api/task.py``) because its models return the mean loss
        (llava, llava_hf, qwen_vl, ...; lmms-eval issue #370), so that is what its evaluator expects."""
        processor = self.vlm.processor
        results = []
        for context, target, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            doc = self._doc(task, split, doc_id)
            continuation = target(doc) if callable(target) else target
            if not isinstance(continuation, str):
                raise DataError(f"{task} doc {doc_id}: the continuation to score is {continuation!r}, not a string")
            results.append(self._continuation_loss(processor, context, self._images(doc_to_visual(doc)), continuation))
        return results

    def _continuation_loss(self, processor: Any, context: str, images: list[Any], continuation: str) -> tuple[float, bool]:
        prompt_ids, loaded = processor.encode_prompt(self._turn(context), images)
        continuation_ids = self.vlm.tokenizer.encode(continuation, add_special_tokens=False)
        if not continuation_ids:
            return 0.0, True
        input_ids = torch.tensor([prompt_ids + continuation_ids], device=self.device)
        pixel_values = processor.pixel_values(loaded) if loaded else None
        logits = self.vlm(input_ids, pixel_values=pixel_values).logits[0, len(prompt_ids) - 1 : -1].float()
        targets = torch.tensor(continuation_ids, device=logits.device)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return float(loss), bool((logits.argmax(-1) == targets).all())

