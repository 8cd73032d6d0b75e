"""Small programs that use chatq from outside, each runnable with `python -m examples.<name>`."""
