"""Protobuf sources of Bonsai's wire format and their generated Python.

``bonsai_tensor.proto`` (package ``bonsai.wire.v1``) is the payload that
``fl.wire`` encodes and decodes. The generated ``*_pb2.py``/``*_pb2.pyi`` are
checked in; ``tests/test_protos.py`` verifies they match the .proto source.
"""
