"""Program indicators: pure computation (compute.py) and the worker stage (stage.py)."""
