"""Students seeded from teachers: hybrids from attention models, multimodal models from Fuyu, image support."""
