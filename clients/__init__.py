"""The Flower ClientApp: a message in, local training or evaluation, a reply out."""
