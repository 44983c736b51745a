"""Plain Flower FedAvg on an .npz dataset: the baseline of benchmarks/scale.py."""
