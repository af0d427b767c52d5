"""Distillation of a seeded student from its teacher, and the speed table that compares them."""
