"""The LLM enhancer in process: the tiny random LLM (whose gibberish the guardrails must catch) and
the external backends against a deterministic fake server speaking their documented APIs."""

import asyncio
import re

import pytest

from deployments.config import EnhancerConfig, LlmConfig
from deployments.enhancer.llm import NEUTRAL_FORM, enhance_messages
from deployments.enhancer.prompt_enhancer import PromptEnhancer, template_enhance, template_revise
from deployments.families import get_family
from deployments.tiny import save_tiny
from tests.llm_server import fake_llm_server

FLUX, SDXL = get_family("flux").prompt_form, get_family("sdxl").prompt_form

Enhancer = PromptEnhancer.func_or_class


def _enhancer(**llm) -> "Enhancer":
    return Enhancer(EnhancerConfig(mode="llm", llm=LlmConfig(**llm), blocklist=["gore"]), metrics=False)


@pytest.fixture(scope="module")
def server():
    with fake_llm_server(slow_s=3.0) as server:
        yield server


def test_template_mode_never_loads_an_llm():
    enhancer = Enhancer(EnhancerConfig(), metrics=False)
    result = asyncio.run(enhancer.enhance("a red fox", "anime"))
    assert result == template_enhance("a red fox", "anime", "high")
    assert "llm" not in enhancer.info()


def test_tiny_llm_runs_and_its_gibberish_falls_back_to_the_template():
    enhancer = _enhancer(source="tiny", max_new_tokens=24, device={"device": "cpu"})
    result = asyncio.run(enhancer.enhance("a red fox in the snow", "cinematic"))
    assert result.enhancer == "template" and result.prompt.startswith("a red fox in the snow, cinematic lighting")
    assert result.fallback_reason.split(":")[0] in {"empty", "not_text", "off_topic"}
    assert enhancer.info()["llm"] == {"backend": "transformers", "source": "tiny"}


def test_tiny_llm_loads_from_a_saved_folder(tmp_path):
    folder = save_tiny("llm", tmp_path / "llm")
    enhancer = _enhancer(source=str(folder), max_new_tokens=8, device={"device": "cpu"})
    result = asyncio.run(enhancer.enhance("a lighthouse at dusk"))
    assert result.enhancer == "template" and result.fallback_reason
    # The saved tokenizer still round-trips any text (byte-level, no merges).
    tokenizer = enhancer._llm._tokenizer
    assert tokenizer.decode(tokenizer("héllo, a fox!")["input_ids"]) == "héllo, a fox!"


def test_tiny_llm_time_budget_falls_back_as_timeout():
    enhancer = _enhancer(source="tiny", max_new_tokens=1024, timeout_s=0.05, device={"device": "cpu"})
    result = asyncio.run(enhancer.enhance("a red fox in the snow"))
    assert result.enhancer == "template" and result.fallback_reason.startswith("timeout")


def test_ollama_answer_is_cleaned_and_used(server):
    enhancer = _enhancer(backend="ollama", source="qwen2.5:1.5b", url=server.url, temperature=0.7, seed=42)
    result = asyncio.run(enhancer.enhance("a red fox in the snow", "photorealistic", target=FLUX))
    assert result.enhancer == "llm" and result.fallback_reason is None
    assert result.prompt == ("a red fox in the snow, rendered in rich detail with soft golden light and a "
                             "balanced composition.")
    # The style's negative preset still applies; the LLM only writes the positive prompt.
    assert result.negative_prompt == template_enhance("x", "photorealistic", "high").negative_prompt
    kind, body = server.requests[-1]
    assert kind == "ollama" and body["model"] == "qwen2.5:1.5b" and body["stream"] is False
    assert body["options"] == {"temperature": 0.7, "seed": 42, "num_predict": 120}
    assert body["prompt"].startswith("a red fox in the snow | photorealistic (")
    assert "natural, flowing sentences" in body["system"] and "Examples:" in body["system"]


def test_sdxl_target_asks_for_tags():
    messages = enhance_messages("a fox", "none", SDXL)
    assert "comma-separated list of short tags" in messages[0]["content"]
    assert "," in messages[2]["content"]  # the few-shot answers are tag lists


def test_a_family_without_a_prompt_form_gets_the_neutral_one_not_another_familys():
    messages = enhance_messages("a fox", "none", None)
    assert messages[0]["content"].count(NEUTRAL_FORM.instructions) == 1
    assert FLUX.instructions not in messages[0]["content"] and SDXL.instructions not in messages[0]["content"]
    assert len(messages) == 2  # no few-shot turns borrowed from a family


def test_openai_compatible_backend(server, monkeypatch):
    monkeypatch.setenv("GENSERVE_TEST_KEY", "secret")
    enhancer = _enhancer(backend="openai", source="served-model", url=server.url + "/", api_key_env="GENSERVE_TEST_KEY")
    result = asyncio.run(enhancer.enhance("a paper boat on a pond", "none", target=SDXL))
    assert result.enhancer == "llm" and result.prompt.startswith("a paper boat on a pond, rendered")
    kind, body = server.requests[-1]
    assert kind == "openai" and body["messages"][0]["role"] == "system" and body["max_tokens"] == 120


@pytest.mark.parametrize("idea, reason", [
    ("a red fox walking slowly", "timeout"),
    ("a red fox that will crash", "backend_error"),
    ("a red fox, offtopic", "off_topic"),
    ("a red fox covered in gore", "blocked"),
])
def test_backend_failures_fall_back_with_a_reason(server, idea, reason):
    enhancer = _enhancer(backend="ollama", source="m", url=server.url, timeout_s=0.5)
    result = asyncio.run(enhancer.enhance(idea, "none"))
    assert result.enhancer == "template" and result.fallback_reason.split(":")[0] == reason
    assert result.prompt == template_enhance(idea, "none", "high").prompt


def test_a_backend_errors_text_reaches_the_log_not_the_caller(server, caplog):
    enhancer = _enhancer(backend="ollama", source="m", url=server.url, timeout_s=0.5)
    with caplog.at_level("INFO", logger="ray.serve"):
        result = asyncio.run(enhancer.enhance("a red fox that will crash", "none"))
    reason = result.fallback_reason
    assert reason.startswith("backend_error") and "crashed" not in reason and "500" not in reason
    request_id = re.search(r"request id ([0-9a-f]{12})", reason).group(1)
    assert any(request_id in record.getMessage() and "model crashed" in record.getMessage()
               for record in caplog.records)


def test_unreachable_backend_falls_back():
    from tests.helpers import free_port

    enhancer = _enhancer(backend="ollama", source="m", url=f"http://127.0.0.1:{free_port()}", timeout_s=2)
    result = asyncio.run(enhancer.enhance("a red fox", "none"))
    assert result.enhancer == "template" and result.fallback_reason.startswith("backend_error")


def test_the_bearer_token_can_come_from_a_file_which_wins_over_the_variable(server, tmp_path, monkeypatch):
    monkeypatch.setenv("GENSERVE_TEST_KEY", "from-the-environment")
    (tmp_path / "token").write_text("from-the-file\n")
    enhancer = _enhancer(backend="openai", source="served-model", url=server.url, api_key_env="GENSERVE_TEST_KEY",
                         api_key_file=str(tmp_path / "token"))
    assert asyncio.run(enhancer.enhance("a paper boat on a pond", "none")).enhancer == "llm"
    assert server.authorizations[-1] == "Bearer from-the-file"
    assert "from-the-file" not in repr(enhancer._config), "the config (a deployment argument) holds no token"


def test_an_unreadable_token_file_names_the_file_never_its_contents(tmp_path):
    (tmp_path / "token").write_bytes(b"sk-\xff-secret")
    with pytest.raises(ValueError, match=r"enhancer\.llm\.api_key_file: .*token is not UTF-8") as caught:
        _enhancer(backend="openai", source="m", url="http://127.0.0.1:1", api_key_file=str(tmp_path / "token"))
    assert "secret" not in str(caught.value) and "xff" not in str(caught.value)
    with pytest.raises(ValueError, match="api_key_file: cannot read .*missing"):
        _enhancer(backend="openai", source="m", url="http://127.0.0.1:1", api_key_file=str(tmp_path / "missing"))


def test_missing_api_key_is_a_config_error(monkeypatch):
    monkeypatch.delenv("GENSERVE_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="GENSERVE_MISSING_KEY"):
        _enhancer(backend="openai", source="m", url="http://127.0.0.1:1", api_key_env="GENSERVE_MISSING_KEY")


def test_template_revision_adds_fixes_for_the_weak_aspects():
    first = template_enhance("a red fox", "none", "none")
    revised = template_revise(first, ["lighting", "composition"], "a red fox")
    assert revised.prompt == "a red fox, soft natural lighting, well lit, balanced exposure, balanced composition, " \
                             "rule of thirds, clear focal point"
    assert template_revise(revised, ["lighting"], "a red fox").prompt == revised.prompt  # nothing said twice
    assert template_revise(first, ["alignment"], "a red fox").prompt == "clearly showing a red fox, a red fox"


def test_llm_revision_uses_the_backend(server):
    enhancer = _enhancer(backend="ollama", source="m", url=server.url)

    async def both():  # one event loop, as in a replica: the HTTP client keeps its connections
        first = await enhancer.enhance("a red fox in the snow", "none")
        return first, await enhancer.revise("a red fox in the snow", first, ["lighting"])

    first, revised = asyncio.run(both())
    assert revised.enhancer == "llm"
    kind, body = server.requests[-1]
    assert "scored low on: lighting" in body["prompt"] and first.prompt in body["prompt"]


@pytest.mark.parametrize("llm, message", [
    ({"backend": "ollama"}, "needs url"),
    ({"backend": "transformers", "url": "http://x"}, "url applies"),
    ({"backend": "ollama", "url": "http://x", "api_key_env": "K"}, "openai backend only"),
    ({"backend": "ollama", "url": "http://x", "api_key_file": "/k"}, "api_key_file applies to the openai backend"),
    ({"source": "not a source"}, "source must be"),
])
def test_llm_config_errors(llm, message):
    with pytest.raises(ValueError, match=message):
        LlmConfig(**llm)


def test_waiting_for_a_busy_local_llm_counts_against_the_time_budget():
    enhancer = _enhancer(source="tiny", max_new_tokens=8, timeout_s=0.2, device={"device": "cpu"})

    async def while_busy():
        await enhancer._lock.acquire()  # another request holds the replica's one model
        try:
            return await enhancer.enhance("a red fox in the snow")
        finally:
            enhancer._lock.release()

    result = asyncio.run(while_busy())
    assert result.enhancer == "template" and result.fallback_reason.startswith("timeout: the LLM stayed busy")
    assert not enhancer._lock.locked()
