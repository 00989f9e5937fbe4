"""caft: concept-aware fine-tuning of causal language models with auxiliary heads."""
