"""Adapters for other libraries' models. Optional: each imports its library only when used."""
