"""The live endpoint: the completion service, its OpenAI-style HTTP app, the Serve deployment, a client."""
