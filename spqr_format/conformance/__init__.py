"""The conformance suite of the .spqr format (SPEC.md section 10, conformance/README.md).

- :mod:`.generate` (+ :mod:`.rejects`): deterministic builders of every vector;
- :mod:`.manifest`: the manifest schema, loading, validation, sha256 checks;
- :mod:`.runner`: run a decoder on every vector and judge it;
- :mod:`.backends`: in-process decoders (``cpu``, ``gpu``, ``module:attribute``) and the
  external command protocol;
- :mod:`.decode_cli`: our decoders behind that protocol
  (``python -m spqr_format.conformance.decode_cli INPUT OUTPUT``);
- :mod:`.image`, :mod:`.layout_faults`: editing valid files into reject vectors;
- :mod:`.stfile`: the safetensors subset decoders write;
- :mod:`.cli`: the ``spqr conformance`` command group.
"""
