"""vLLM sweep slots: a Ray actor per slot running vLLM servers (from the vLLM environment) for one
configuration and its no-speculation twin, driving them with concurrent streams (spectune.workers.vllm)."""
