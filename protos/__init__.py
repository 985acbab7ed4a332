"""The KServe v2 / Triton protocol's generated stubs (``python -m cnnctl.protos.generate``).

``POOL`` is the descriptor pool they register in: cnnctl's own, not protobuf's default one, so
that ``tritonclient.grpc``, which defines the same ``inference.*`` messages, loads beside them.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
