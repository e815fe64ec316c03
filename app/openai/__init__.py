"""OpenAI-compatible /v1: the bodies and what they refuse (protocol, not_served), the serving of completions and
chat completions (serving, serving_completion, serving_chat), logprobs and the chat template. The routes in
app.routes.openai only parse, call serving and return."""
