"""Prompt enhancement: the PromptEnhancer deployment, its LLM backends, advice and guardrails."""
