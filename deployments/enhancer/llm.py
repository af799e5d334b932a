"""LLM backends of the prompt enhancer, and the few-shot chat that asks them for a prompt.

- `TransformersLlm`: an instruction-tuned causal LM in the replica (`AutoModelForCausalLM`), prompted
  through its own chat template; greedy, or sampled with a fixed seed; bounded by a token budget and
  a time budget (`generate(max_time=...)`).
- `OllamaLlm`: Ollama's `POST /api/generate` (non-streaming).
- `OpenAiLlm`: any OpenAI-compatible `POST /v1/chat/completions` (vLLM, llama.cpp server, ...).

Each returns the raw answer text or raises `LlmError` with a short reason; judging the answer
(guardrails) is the enhancer's job (`deployments.enhancer.prompt_rules`).
"""

from __future__ import annotations

import logging
import time

from deployments.config import LlmConfig
from deployments.runtime.loading import Placement, is_tiny, pretrained_location
from deployments.runtime.types import PromptForm
from deployments.secrets import read_secret

logger = logging.getLogger("ray.serve")
# A prompt's tokens, roughly, for a simulated LLM's prefill: English runs about 4 characters a token.
CHARS_PER_TOKEN = 4

# The prompt form of a family that declares none: plain, concrete, no model-specific syntax.
NEUTRAL_FORM = PromptForm(
    instructions="Write one clear sentence (at most 50 words) naming the subject, setting, lighting and style.",
)

SYSTEM_PROMPT = (
    "You turn a short image idea into a detailed prompt for a text-to-image model. Keep the user's subject "
    "and every object they name; add setting, lighting, composition and style details that fit. "
    "{rules} Answer with the prompt only: no introduction, no quotes, no explanation."
)


class LlmError(RuntimeError):
    """The backend gave no usable answer; `reason` is short and stable (it becomes a metric tag)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def enhance_messages(idea: str, style_hint: str, form: PromptForm | None) -> list[dict]:
    """System prompt, few-shot turns and the user's idea, as chat messages, in the target family's form."""
    form = form or NEUTRAL_FORM
    messages = [{"role": "system", "content": SYSTEM_PROMPT.format(rules=form.instructions)}]
    for example, answer in form.examples:
        messages += [{"role": "user", "content": example}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": f"{idea.strip()} | {style_hint}"})
    return messages


def revise_messages(idea: str, previous: str, weak: list[str], form: PromptForm | None) -> list[dict]:
    """Ask for a rewrite of `previous` that fixes the aspects the scorer found weakest."""
    system = SYSTEM_PROMPT.format(rules=(form or NEUTRAL_FORM).instructions)
    user = (
        f"The idea was: {idea.strip()}\nThe prompt used was: {previous}\n"
        f"The image it gave scored low on: {', '.join(weak)}. Rewrite the prompt so the image improves on "
        "those points, keeping the same subject."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def build_llm(config: LlmConfig, placement: Placement | None):
    if config.backend == "transformers" and placement is not None and placement.simulated is not None:
        return SimulatedLlm(config, placement)
    if config.backend == "transformers":
        return TransformersLlm(config, placement)
    if config.backend == "ollama":
        return OllamaLlm(config)
    return OpenAiLlm(config)


class TransformersLlm:
    """A causal LM in this process. Not safe under concurrent calls: the caller serialises them."""

    backend = "transformers"

    def __init__(self, config: LlmConfig, placement: Placement):
        self._config = config
        self._placement = placement
        if is_tiny(config.source):
            from deployments.runtime.tiny import build_tiny_llm

            parts = build_tiny_llm()
            model, self._tokenizer = parts["model"], parts["tokenizer"]
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            location = pretrained_location(config.source)
            self._tokenizer = AutoTokenizer.from_pretrained(location)
            model = AutoModelForCausalLM.from_pretrained(location, dtype=placement.dtype, use_safetensors=True)
        if self._tokenizer.chat_template is None:
            raise ValueError(f"LLM {config.source!r} has no chat template: use an instruction-tuned model")
        self._model = model.to(device=placement.device, dtype=placement.dtype).eval()

    @property
    def device(self) -> str:
        return self._placement.device

    def complete(self, messages: list[dict], time_budget_s: float | None = None) -> str:
        """The answer within `time_budget_s` (default: the config's timeout_s), else LlmError('timeout')."""
        import torch

        config = self._config
        budget = config.timeout_s if time_budget_s is None else time_budget_s
        if budget <= 0:
            raise LlmError("timeout", "no time left in the budget")
        inputs = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self._placement.device)
        sampling: dict = {"do_sample": False}
        if config.temperature > 0:
            torch.manual_seed(config.seed)  # calls are serialised, so the global RNG is ours here
            sampling = {"do_sample": True, "temperature": config.temperature, "top_p": 0.95}
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self._tokenizer.eos_token_id
        started = time.perf_counter()
        with torch.inference_mode():
            output = self._model.generate(
                **inputs, max_new_tokens=config.max_new_tokens, max_time=budget, pad_token_id=pad, **sampling,
            )
        if time.perf_counter() - started >= budget:
            raise LlmError("timeout", f"no complete answer within {budget:.3g}s")
        answer = output[0, inputs["input_ids"].shape[1]:]
        return self._tokenizer.decode(answer, skip_special_tokens=True)


class SimulatedLlm:
    """Stands in for the enhancer's in-process LLM: the prefill of the prompt and `max_new_tokens`
    decode steps (each at least one read of the weights: the memory-bound part), modelled on the
    card. Its answer is the user's last message, unchanged: on-topic, so the guardrails pass it."""

    backend = "transformers"

    def __init__(self, config: LlmConfig, placement: Placement):
        from deployments.runtime.sim import flops
        from deployments.runtime.sim.models import ledger_with
        from deployments.sim_profiles import profile

        self._config = config
        self._placement = placement
        self.arch = flops.architecture_for(config.source)
        self.card = profile(placement.simulated)
        self.ledger = ledger_with(self.arch, placement, "llm")

    @property
    def device(self) -> str:
        return self._placement.device

    def modelled_s(self, messages: list[dict]) -> float:
        from deployments.runtime.sim.timing import model_call_s

        prompt_tokens = max(1, sum(len(message["content"]) for message in messages) // CHARS_PER_TOKEN)
        prefill = {"tokens": 256}  # counted at 256 tokens; a prompt's FLOPs scale with its length
        return model_call_s(self.arch, self.card, [(prefill, prompt_tokens / 256),
                                                   ({"tokens": 1}, self._config.max_new_tokens)])

    def complete(self, messages: list[dict], time_budget_s: float | None = None) -> str:
        budget = self._config.timeout_s if time_budget_s is None else time_budget_s
        if budget <= 0:
            raise LlmError("timeout", "no time left in the budget")
        seconds = self.modelled_s(messages)
        time.sleep(min(seconds, budget))
        if seconds >= budget:
            raise LlmError("timeout", f"no complete answer within {budget:.3g}s (simulated)")
        return messages[-1]["content"].split(" | ")[0]


class _HttpLlm:
    def __init__(self, config: LlmConfig):
        import httpx

        self._config = config
        headers = {}
        # Read here, on the replica: the token is in no deployment argument, and an error names only its source.
        key = read_secret(config.api_key_env, config.api_key_file, field="enhancer.llm.api_key", required=True)
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            base_url=config.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(config.timeout_s)
        )

    async def _post(self, path: str, body: dict) -> dict:
        import httpx

        try:
            response = await self._client.post(path, json=body)
        except httpx.TimeoutException:
            raise LlmError("timeout", f"{self.backend} did not answer within {self._config.timeout_s:g}s") from None
        except httpx.HTTPError as error:
            raise LlmError("backend_error", f"{type(error).__name__}: {error}"[:200]) from None
        if response.status_code != 200:
            raise LlmError("backend_error", f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            raise LlmError("backend_error", "the answer is not JSON") from None


class OllamaLlm(_HttpLlm):
    """Ollama's `/api/generate`: one system string and one prompt, so the few-shot turns go in the system."""

    backend = "ollama"

    async def complete(self, messages: list[dict]) -> str:
        config = self._config
        system = messages[0]["content"]
        shots = messages[1:-1]
        if shots:
            system += "\n\nExamples:\n" + "\n".join(
                f"{'Idea' if turn['role'] == 'user' else 'Prompt'}: {turn['content']}" for turn in shots
            )
        body = {
            "model": config.source,
            "system": system,
            "prompt": messages[-1]["content"],
            "stream": False,
            "options": {"temperature": config.temperature, "seed": config.seed, "num_predict": config.max_new_tokens},
        }
        answer = await self._post("/api/generate", body)
        text = answer.get("response") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise LlmError("backend_error", "no 'response' string in Ollama's answer")
        return text


class OpenAiLlm(_HttpLlm):
    """An OpenAI-compatible `/v1/chat/completions`."""

    backend = "openai"

    async def complete(self, messages: list[dict]) -> str:
        config = self._config
        body = {
            "model": config.source,
            "messages": messages,
            "max_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "seed": config.seed,
        }
        answer = await self._post("/v1/chat/completions", body)
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LlmError("backend_error", "no choices[0].message.content in the answer") from None
        if not isinstance(text, str):
            raise LlmError("backend_error", "choices[0].message.content is not a string")
        return text
