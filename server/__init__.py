"""The Flower ServerApp: config -> strategy -> rounds -> evaluation and results."""
