"""The model catalogue: profiles, hardware checks, model preparation."""
