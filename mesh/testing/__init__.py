"""Testing agents against the real RabbitMQ and Redis, each test on a vhost and a Redis
namespace of its own.

The pytest plugin (``mesh.testing.plugin``, loaded through the ``pytest11`` entry point
``mesh``) provides the ``mesh_*`` fixtures; what it builds on works without pytest too.
"""

from mesh.testing.harness import MeshHarness, Subscription
from mesh.testing.isolation import delete_namespace, new_namespace, own_vhost

__all__ = ["MeshHarness", "Subscription", "delete_namespace", "new_namespace", "own_vhost"]
