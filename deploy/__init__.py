"""Use the model: GGUF export verified in llama.cpp, an OpenAI-compatible server, a browser chat."""
