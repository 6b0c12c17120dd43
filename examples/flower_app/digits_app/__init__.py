"""digits_app: a Flower quickstart (PyTorch) on scikit-learn's digits, with gradpress."""
